"""The public ops' contract at its edges, as a user calls them: a second-order backward
(``create_graph=True``, e.g. a gradient penalty) fails loudly rather than returning gradients
that silently lack the loss's second-order terms; every argument the torch reference accepts
(an integer ``label_offset`` as a 0-dim tensor or numpy int) works on the kernel path too;
shape errors name the argument at fault; inside torch.compile the ops run eagerly (a graph
break). Under the Triton interpreter on CPU (or on CUDA when a GPU exists); re-runs itself in a
fresh process if Triton was imported before TRITON_INTERPRET=1.
Expected runtime: ~10 s on 2 cores.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import numpy as np
import pytest
import torch.nn.functional as F

import kernels
from kernels.reference import clip_loss_reference, contrastive_ce_reference, sigmoid_loss_reference
from kernels.testing import run_module_in_interpreter, triton_mode

MODE = triton_mode()
DEVICE = "cuda" if MODE == "gpu" else "cpu"
pytestmark = pytest.mark.skipif(MODE == "none", reason="Triton is not installed")
in_process = pytest.mark.skipif(
    MODE == "subprocess",
    reason="Triton was imported before TRITON_INTERPRET=1; see test_rerun_in_fresh_interpreter",
)

N, M, D, OFFSET = 6, 9, 20, 2
OPS = {
    "contrastive_ce": (
        lambda q, k: kernels.contrastive_ce(q, k, 5.0, label_offset=OFFSET),
        lambda q, k: contrastive_ce_reference(q, k, 5.0, label_offset=OFFSET),
    ),
    "clip_loss": (
        lambda q, k: kernels.clip_loss(q, k[:N], 5.0),
        lambda q, k: clip_loss_reference(q, k[:N], 5.0),
    ),
    "sigmoid_loss": (
        lambda q, k: kernels.sigmoid_loss(q, k, 5.0, -1.0, label_offset=OFFSET),
        lambda q, k: sigmoid_loss_reference(q, k, 5.0, -1.0, label_offset=OFFSET),
    ),
}


def test_rerun_in_fresh_interpreter():
    if MODE != "subprocess":
        pytest.skip("the interpreter (or a GPU) is active in this process")
    r = run_module_in_interpreter(__file__)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def _penalised(op, dtype):
    """``loss + |dloss/dq|^2`` backpropagated into both feature sets (a gradient penalty)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    q, k = (x.to(device=DEVICE, dtype=dtype).requires_grad_() for x in (q, k))
    loss = op(q, k)
    (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
    (loss + grad_q.pow(2).sum()).backward()
    return q.grad, k.grad


@in_process
@pytest.mark.parametrize("name", list(OPS))
def test_second_order_backward_is_refused_not_silently_wrong(name):
    kernel_op, reference_op = OPS[name]
    _penalised(reference_op, torch.float64)  # the reference is twice differentiable
    # The kernels' backward is not differentiable: the penalty's second-order terms used to be
    # dropped without a word (gradients 3-8x too small here); now create_graph=True refuses.
    with pytest.raises(RuntimeError, match="no second derivative"):
        _penalised(kernel_op, torch.float32)


@in_process
@pytest.mark.parametrize("name", list(OPS))
def test_plain_backward_under_enable_grad_is_not_refused(name):
    """Only create_graph=True turns grad mode on inside a backward: an ordinary backward, even
    called inside ``torch.enable_grad()``, still gets the kernels' gradients."""
    kernel_op, reference_op = OPS[name]
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    grads = []
    for op, dtype in ((kernel_op, torch.float32), (reference_op, torch.float64)):
        qa, ka = (x.to(device=DEVICE, dtype=dtype).requires_grad_() for x in (q, k))
        with torch.enable_grad():
            grads.append(torch.autograd.grad(op(qa, ka), (qa, ka)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-6)


@in_process
@pytest.mark.parametrize("offset", [torch.tensor(OFFSET), np.int64(OFFSET)], ids=["tensor", "numpy"])
def test_label_offset_as_any_integer_matches_the_reference(offset):
    """The reference took these; the kernels passed them to Triton as a pointer or an unknown
    type and failed inside its compiler (the interpreter: "invalid operands of type pointer")."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    q, k = q.to(DEVICE).requires_grad_(), k.to(DEVICE)
    ce = kernels.contrastive_ce(q, k, 5.0, label_offset=offset)
    assert "ContrastiveCE" in type(ce.grad_fn).__name__, "kernel path not taken"
    ref = contrastive_ce_reference(q.double(), k.double(), 5.0, label_offset=OFFSET)
    torch.testing.assert_close(ce.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-6)
    sig = kernels.sigmoid_loss(q, k, 5.0, -1.0, label_offset=offset)
    ref = sigmoid_loss_reference(q.double(), k.double(), 5.0, -1.0, label_offset=OFFSET)
    torch.testing.assert_close(sig.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-6)


@in_process
def test_argument_errors_name_what_is_wrong():
    q, k = torch.randn(N, D, device=DEVICE), torch.randn(M, D, device=DEVICE)
    for op in (kernels.contrastive_ce, lambda q, k, s, **kw: kernels.sigmoid_loss(q, k, s, 0.0, **kw)):
        with pytest.raises(ValueError, match="label_offset must be an integer"):
            op(q, k, 5.0, label_offset=1.5)
    # More images than texts: the square rule, not a label_offset clip_loss has no argument for.
    for op in (kernels.clip_loss, clip_loss_reference):
        with pytest.raises(ValueError, match="as many images as texts"):
            op(k, q, 5.0)


@in_process
@pytest.mark.parametrize("name", list(OPS))
def test_fp32_gradients_stay_fp32_when_backward_runs_under_autocast(name):
    """A forward in fp32 outside autocast and its backward() inside a bf16 autocast block: the
    interpreter's gradient GEMMs followed the autocast and ran in bf16 (3e-3 off). They stay
    exact fp32 (torch's own reference does not: its backward matmuls go bf16 there)."""
    kernel_op, reference_op = OPS[name]
    g = torch.Generator().manual_seed(4)
    q, k = (F.normalize(torch.randn(n, D, generator=g), dim=-1).to(DEVICE) for n in (N, M))
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = kernel_op(a, b)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss.backward()
    a64, b64 = q.double().requires_grad_(), k.double().requires_grad_()
    reference_op(a64, b64).backward()  # exact, no autocast
    torch.testing.assert_close(a.grad, a64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b64.grad.float(), rtol=1e-5, atol=1e-6)


@in_process
@pytest.mark.parametrize("name", list(OPS))
def test_fp32_beside_bf16_features_under_autocast_run_in_bf16(name):
    """Under autocast a tower left in fp32 beside one in bf16 is what the reference's matmul takes
    (both in bf16); the kernels refused it ("must share a dtype"), in either order."""
    kernel_op, reference_op = OPS[name]
    g = torch.Generator().manual_seed(3)
    q, k = (F.normalize(torch.randn(n, D, generator=g), dim=-1).to(DEVICE) for n in (N, M))
    as_bf16 = kernel_op(q.bfloat16(), k.bfloat16())
    for a, b in ((q, k.bfloat16()), (q.bfloat16(), k)):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            ours, ref = kernel_op(a, b), reference_op(a, b)
        assert torch.equal(ours, as_bf16), (ours.item(), as_bf16.item())
        torch.testing.assert_close(ours, ref.float(), rtol=2e-2, atol=2e-2)
        ours.backward()
        assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype  # each gradient in its own dtype
    with pytest.raises(ValueError, match="must share a dtype"):  # outside autocast: still refused
        kernel_op(q, k.bfloat16())


COMPILED_OPS = {
    "contrastive_ce": (kernels.contrastive_ce, contrastive_ce_reference, M, {"label_offset": OFFSET}),
    "clip_loss": (kernels.clip_loss, clip_loss_reference, N, {}),
    "sigmoid_loss": (
        lambda q, k, s: kernels.sigmoid_loss(q, k, s, -1.0, label_offset=OFFSET),
        lambda q, k, s: sigmoid_loss_reference(q, k, s, -1.0, label_offset=OFFSET),
        M,
        {},
    ),
}


@in_process
@pytest.mark.parametrize("name", list(COMPILED_OPS))
def test_ops_inside_torch_compile_run_eagerly_and_match_the_reference(name):
    """A loss inside a compiled function: Dynamo traced into the kernels' launch code, and under
    the interpreter failed with "failed to run FX node with fake tensors" (a long traceback through
    Triton's interpreter); the ops now break the graph and run as in eager mode."""
    kernel_op, reference_op, m, kwargs = COMPILED_OPS[name]
    g = torch.Generator().manual_seed(4)
    q, k = (F.normalize(torch.randn(n, D, generator=g), dim=-1).to(DEVICE) for n in (N, m))
    results = []
    for op, compile_it in ((kernel_op, True), (reference_op, False)):
        qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
        scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)

        def step(q, k, s, op=op):
            return 2 * op(q, k, s, **kwargs)

        fn = torch.compile(step, backend="eager") if compile_it else step
        loss = fn(qa, ka, scale)
        loss.backward()
        results.append((loss, qa.grad, ka.grad, scale.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the ops import Triton on first use")
def test_ops_import_no_triton_on_a_cpu_without_the_interpreter():
    """The compile guard above must not import ``torch._dynamo`` (which imports Triton) outside
    torch.compile: Triton fixes interpreter mode at its first import."""
    code = (
        "import sys, torch, kernels\n"
        "q, k = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8)\n"
        "kernels.contrastive_ce(q, k, 3.0).backward(); kernels.clip_loss(q, k[:4], 3.0)\n"
        "kernels.sigmoid_loss(q, k, 3.0, -1.0)\n"
        "assert 'triton' not in sys.modules, 'Triton imported'\n"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
