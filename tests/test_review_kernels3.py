"""Review of the kernels (third round): the torch reference forms the logits as the kernels do
(fp32, so fp16 no longer overflows), a tuned tile table is only used for the dtype and Triton
version it was timed with, and the ops' argument checks. CPU only; the conftest sets
TRITON_INTERPRET. A GPU's capability and properties are stood in for through torch.cuda's own
functions (this machine has none); the code under test runs as is."""

import json
import logging
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import kernels
from kernels import reference, runtime, tile_configs
from kernels.tile_configs import Entry, TileConfig


def _features(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True) * norm


def _ce64(q, k, s, off):
    x = s * q @ k.T
    rows = torch.arange(q.shape[0])
    return (torch.logsumexp(x, 1) - x[rows, rows + off]).mean()


def _clip64(q, k, s):
    x = s * q @ k.T
    diag = x.diagonal()
    return ((torch.logsumexp(x, 1) - diag).mean() + (torch.logsumexp(x, 0) - diag).mean()) / 2


def _sigmoid64(q, k, s, b, off):
    x = s * q @ k.T + b
    z = -torch.ones_like(x)
    rows = torch.arange(q.shape[0])
    z[rows, rows + off] = 1
    return torch.logaddexp(torch.zeros_like(x), -z * x).sum() / q.shape[0]


OFF = 11
REFERENCE_OPS = {  # (reference op, the fp64 definition), on 13 queries against 24 keys
    "contrastive_ce": (
        lambda a, b: reference.contrastive_ce_reference(a, b, 100.0, label_offset=OFF),
        lambda a, b: _ce64(a, b, 100.0, OFF),
    ),
    "clip_loss": (
        lambda a, b: reference.clip_loss_reference(a, b[:13], 100.0),
        lambda a, b: _clip64(a, b[:13], 100.0),
    ),
    "sigmoid_loss": (
        lambda a, b: reference.sigmoid_loss_reference(a, b, 100.0, -10.0, label_offset=OFF),
        lambda a, b: _sigmoid64(a, b, 100.0, -10.0, OFF),
    ),
}


@pytest.mark.parametrize("name", list(REFERENCE_OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "fp32 under bf16 autocast"])
def test_reference_forms_fp32_logits_like_the_kernels(name, dtype):
    """Features of norm 30 at scale 100 give logits up to 9e4, past fp16's 65504: the reference's
    fp16 logits were inf and its loss NaN where the kernels (fp32 tiles) stay finite; bf16 logits
    (and fp32 features under bf16 autocast) were rounded to 8 bits, 15 off in a loss of 4e4. The
    reference must now match the fp64 loss of the same rounded features to fp32 accuracy, and give
    finite gradients in the inputs' dtype."""
    op, exact = REFERENCE_OPS[name]
    q, k = _features(13, 20, 30.0, seed=1), _features(24, 20, 30.0, seed=2)
    autocast = isinstance(dtype, str)
    runs_in = torch.bfloat16 if autocast else dtype
    a = (q.float() if autocast else q.to(dtype)).requires_grad_()
    b = (k.float() if autocast else k.to(dtype)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = op(a, b)
    want = exact(q.to(runs_in).double(), k.to(runs_in).double()).item()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want) <= 1e-5 * abs(want), (loss.item(), want)
    loss.backward()
    for x in (a, b):
        assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all()


def test_reference_agrees_with_the_kernels_on_fp16_beyond_its_range():
    """The README: the reference has the same semantics as the kernels. In fp16 with logits past
    65504 the reference was NaN and the interpreter's kernels finite."""
    if not runtime.interpreting():
        pytest.skip("needs the Triton interpreter")
    q, k = _features(13, 20, 30.0, seed=3).half(), _features(24, 20, 30.0, seed=4).half()
    for kernel_op, reference_op in (
        (kernels.contrastive_ce, reference.contrastive_ce_reference),
        (
            lambda a, b, s: kernels.sigmoid_loss(a, b, s, -10.0),
            lambda a, b, s: reference.sigmoid_loss_reference(a, b, s, -10.0),
        ),
    ):
        ours, ref = kernel_op(q, k[:13], 100.0), reference_op(q, k[:13], 100.0)
        assert torch.isfinite(ours) and torch.isfinite(ref)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        kernels.clip_loss(q, k[:13], 100.0),
        reference.clip_loss_reference(q, k[:13], 100.0),
        rtol=1e-5,
        atol=0,
    )


def test_reference_keeps_a_float32_result_for_a_float64_scale_of_shape_1():
    """README: the result is float32. A [1]-shaped float64 logit_scale (or bias) promoted the
    reference's [N, M] logits, and so its loss, to float64, where the kernels return float32."""
    q, k = _features(8, 16, 1.0, seed=5).float(), _features(8, 16, 1.0, seed=6).float()
    scale, bias = torch.tensor([10.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    assert reference.contrastive_ce_reference(q, k, scale).dtype == torch.float32
    assert reference.clip_loss_reference(q, k, scale).dtype == torch.float32
    assert reference.sigmoid_loss_reference(q, k, 10.0, bias).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_features_are_one_clear_error_on_every_op(dtype):
    """Integer or bool "features" (token ids, masks passed by mistake) ran an integer matmul in
    the reference and gave a loss; they are refused, naming the dtypes to use."""
    q, k = torch.ones(8, 4, dtype=dtype), torch.ones(8, 4, dtype=dtype)
    for call in (
        lambda: kernels.contrastive_ce(q, k, 10.0),
        lambda: kernels.clip_loss(q, k, 10.0),
        lambda: kernels.sigmoid_loss(q, k, 10.0, -1.0),
    ):
        with pytest.raises(ValueError, match="floating-point features"):
            call()


# ---- the tuned tile table: dtype and Triton version -------------------------------------------

BUILT_IN = tile_configs.TABLE[("sm_90", "ce_grad", "large")].config
TUNED = TileConfig(64, 128, 64, 4, 3)


@pytest.fixture
def tuned_table(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(path))
    monkeypatch.setattr(tile_configs, "_SKIPPED", set(), raising=False)
    tile_configs.load_tuned.cache_clear()
    yield path
    tile_configs.load_tuned.cache_clear()


def _write(path, dtype, triton):
    tile_configs.write_tuned(
        path, {("sm_90", "ce_grad", "large"): Entry(TUNED, "tuned: test", dtype, triton)}
    )


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == tile_configs.__name__]


def test_a_tuned_entry_is_used_only_for_its_dtype(tuned_table, caplog, monkeypatch):
    """A table tuned for bf16 was used as is for fp32 (or fp16) launches, whose timings it never
    saw. Its entry serves bf16 launches; others take the built-in config, with one logged line
    that names the file and the re-tune command. The written file records both fields."""
    _write(tuned_table, "bfloat16", tile_configs.triton_version())
    row = json.loads(tuned_table.read_text())["entries"][0]
    assert row["dtype"] == "bfloat16" and row["triton"] == tile_configs.triton_version()
    caplog.set_level(logging.WARNING, logger=tile_configs.__name__)
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16).config == TUNED
    assert _warnings(caplog) == []
    for _ in range(2):
        assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.float32).config == BUILT_IN
    (line,) = _warnings(caplog)  # once, not per launch
    assert str(tuned_table) in line and "--autotune --dtype float32" in line and "bfloat16" in line
    # A launch passes its inputs' dtype: fp32 features on a (stood-in) H100 skip the bf16 entry.
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    props = SimpleNamespace(shared_memory_per_block_optin=232_448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "hip", None)
    inputs = {dt: torch.empty(1, 1, dtype=dt, device="meta") for dt in (torch.bfloat16, torch.float32)}
    assert runtime.tile_config("ce_grad", inputs[torch.bfloat16], 32768, 32768, 768) == TUNED
    fp32 = runtime.tile_config("ce_grad", inputs[torch.float32], 32768, 32768, 768)
    # The fit a launch makes: this card (9.0), this kernel, the dot precision fp32 runs at (exact).
    assert fp32 == tile_configs.fit_shared_memory(BUILT_IN, 4, 232_448, "9.0", "ce_grad", "ieee")


def test_a_tuned_entry_of_another_triton_version_is_not_used(tuned_table, caplog):
    """A config tuned under another Triton may fail to compile or spill under this one."""
    _write(tuned_table, "bfloat16", "0.0.1")
    caplog.set_level(logging.WARNING, logger=tile_configs.__name__)
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16).config == BUILT_IN
    (line,) = _warnings(caplog)
    assert "triton 0.0.1" in line and f"triton {tile_configs.triton_version()}" in line


def test_a_table_written_before_dtype_and_version_were_recorded_still_applies(tuned_table, caplog):
    row = {"arch": "sm_90", "kind": "ce_grad", "shape_class": "large", "config": TUNED.as_list()}
    tuned_table.write_text(json.dumps({"entries": [row]}))
    caplog.set_level(logging.WARNING, logger=tile_configs.__name__)
    for dtype in (torch.bfloat16, torch.float32, None):
        assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, dtype).config == TUNED
    assert _warnings(caplog) == []
    row["dtype"] = 16
    tuned_table.write_text(json.dumps({"entries": [row]}))
    tile_configs.load_tuned.cache_clear()
    with pytest.raises(ValueError, match="dtype must be a string"):
        tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16)


def test_autotune_records_the_dtype_and_triton_version_it_timed(tmp_path):
    from kernels.bench_autotune import autotune

    autotune([(32, 32, 32)], ["sigmoid"], torch.float32, torch.device("cpu"), tmp_path, "32,32,32,4,1", 1)
    rows = json.loads((tmp_path / "tuned_configs.json").read_text())["entries"]
    assert {r["kind"] for r in rows} == {"sig_fwd", "sig_grad"}
    assert all(r["dtype"] == "float32" and r["triton"] == tile_configs.triton_version() for r in rows)
    tile_configs.load_tuned.cache_clear()
    table = tile_configs.load_tuned(str(tmp_path / "tuned_configs.json"))
    assert {e.dtype for e in table.values()} == {"float32"}
    tile_configs.load_tuned.cache_clear()


def test_more_queries_than_keys_says_to_swap_them_not_to_pick_an_impossible_offset():
    """With N > M the label range error read "it must lie in [0, -20]": no offset satisfies it."""
    q, k = torch.randn(40, 8), torch.randn(20, 8)
    for call in (
        lambda: kernels.contrastive_ce(q, k, 10.0),
        lambda: kernels.sigmoid_loss(q, k, 10.0, -1.0),
        lambda: reference.contrastive_ce_reference(q, k, 10.0),
    ):
        with pytest.raises(ValueError, match=r"queries \(N=40\) outnumber keys \(M=20\)") as info:
            call()
        assert "[0, -" not in str(info.value)
