"""The public kernel ops at their API edges, on both of their paths: the Triton kernels (the
interpreter on CPU) and the torch reference they fall back to where Triton cannot run. The same
call must give the same answer or the same error on either path, and ``TRITON_INTERPRET`` means
what Triton reads it as. Expected runtime: ~5 s on 2 cores.
"""

import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import numpy as np
import pytest

import kernels
from kernels import runtime
from kernels.testing import triton_mode

MODE = triton_mode()
DEVICE = "cuda" if MODE == "gpu" else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, M, D = 4, 6, 8

# Each public op with a scale (and bias) argument slot: (name, call(q, k, scale, bias)).
OPS = {
    "contrastive_ce": lambda q, k, s, b: kernels.contrastive_ce(q, k, s, label_offset=1),
    "clip_loss": lambda q, k, s, b: kernels.clip_loss(q, k[:N], s),
    "sigmoid_loss": lambda q, k, s, b: kernels.sigmoid_loss(q, k, s, b, label_offset=1),
}


def _paths():
    """The paths this process can run: the reference always, Triton where it can run."""
    return ["reference"] + (["triton"] if MODE in ("gpu", "interpreter") else [])


def _force_path(monkeypatch, path):
    if path == "reference":  # as on a CPU without the interpreter, or a GPU Triton cannot compile for
        for name in ("contrastive_ce", "clip_loss", "sigmoid_loss"):
            monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "use_triton", lambda *t: False)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_scale_of_several_values_is_refused_on_every_path(monkeypatch, op, path):
    # A per-GPU logit_scale gathered by nn.DataParallel has shape [GPUs]. The kernels refused it,
    # but the reference broadcast it against the [N, M] logits: with as many values as columns,
    # a per-column scale and a silently different loss on machines where Triton does not run.
    _force_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(r, D, generator=gen).to(DEVICE) for r in (N, M))
    cols = M if op != "clip_loss" else N
    several = torch.linspace(1.0, 10.0, cols, device=DEVICE)
    with pytest.raises(ValueError, match=rf"logit_scale must hold one value; got shape \({cols},\)"):
        OPS[op](q, k, several, 0.5)
    if op == "sigmoid_loss":
        with pytest.raises(ValueError, match=rf"logit_bias must hold one value; got shape \({cols},\)"):
            OPS[op](q, k, 2.0, several)
        with pytest.raises(ValueError, match="logit_bias must be a number or a one-element tensor; got None"):
            OPS[op](q, k, 2.0, None)
    with pytest.raises(ValueError, match="logit_scale must be a number or a one-element tensor; got None"):
        OPS[op](q, k, None, 0.5)
    # Every form of one value still works, and gives the same loss.
    forms = [2.0, np.float32(2.0), torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([[2.0]])]
    losses = [OPS[op](q, k, s.to(DEVICE) if isinstance(s, torch.Tensor) else s, 0.5) for s in forms]
    for loss in losses[1:]:
        torch.testing.assert_close(loss.reshape(()), losses[0].reshape(()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "value,requested",
    [("1", True), ("true", True), ("TRUE", True), ("on", True), ("yes", True)]
    + [("0", False), ("", False), ("false", False), ("False", False), ("off", False), ("no", False)],
)
def test_interpreter_is_requested_only_by_values_triton_reads_as_true(monkeypatch, value, requested):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert runtime.interpret_requested() is requested


def test_triton_interpret_false_neither_imports_triton_nor_warns_on_a_cpu():
    # TRITON_INTERPRET=false (e.g. one value of a CI matrix) turned the interpreter off in Triton,
    # but counted as a request here: Triton was imported on a CPU, and the ops warned that the
    # variable "was set after Triton was imported" and told the user to set it to 1.
    code = (
        "import sys, warnings\n"
        "import torch, kernels\n"
        "warnings.simplefilter('error')\n"
        "q = torch.randn(4, 8)\n"
        "out = kernels.contrastive_ce(q, q, 2.0)\n"
        "assert torch.equal(out, kernels.reference.contrastive_ce_reference(q, q, 2.0))\n"
        "assert not kernels.triton_available()\n"
        "assert 'triton' not in sys.modules, 'Triton was imported'\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="false", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
