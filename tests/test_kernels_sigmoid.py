"""kernels.sigmoid_loss (SigLIP) against an fp64 torch oracle, under the Triton
interpreter on CPU (or on CUDA when a GPU exists); re-runs itself in a fresh process
if Triton was imported before TRITON_INTERPRET=1. Expected runtime: ~25 s on 2 cores.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import pytest
import torch.nn.functional as F
from sigmoid_cases import assert_matches, loss_and_grads, open_clip_siglip_loss

from kernels import sigmoid_loss
from kernels.reference import sigmoid_loss_reference
from kernels.testing import run_module_in_interpreter, triton_mode

MODE = triton_mode()
DEVICE = "cuda" if MODE == "gpu" else "cpu"
pytestmark = pytest.mark.skipif(MODE == "none", reason="Triton is not installed")
in_process = pytest.mark.skipif(
    MODE == "subprocess",
    reason="Triton was imported before TRITON_INTERPRET=1; see test_rerun_in_fresh_interpreter",
)


def test_rerun_in_fresh_interpreter():
    if MODE != "subprocess":
        pytest.skip("the interpreter (or a GPU) is active in this process")
    r = run_module_in_interpreter(__file__)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def _pairs(n, m, d, off, dtype=torch.float32, seed=0, noise=0.8):
    """Normalised keys; queries near their positives (rows off..off+n of the keys)."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    q = F.normalize(k[off : off + n] + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return q.to(dtype), k.to(dtype)


def _check(q, k, scale, bias, off, rtol, atol=0.0):
    ours, out = loss_and_grads(sigmoid_loss, q, k, scale, bias, off, device=DEVICE)
    assert "SigmoidLoss" in type(out.grad_fn).__name__, "kernel path not taken"
    ref, _ = loss_and_grads(sigmoid_loss_reference, q, k, scale, bias, off, device="cpu", dtype=torch.float64)
    assert_matches(ours, ref, rtol, atol)
    return ours


@in_process
@pytest.mark.parametrize(
    "n,m,d,off,scale,bias",
    [  # ragged, one-element, D not a multiple of BD, offsets; SigLIP init (10, -10) and trained-like
        (1, 1, 16, 0, 10.0, -10.0),
        (7, 48, 24, 41, 10.0, -10.0),
        (37, 111, 130, 70, 100.0, -10.0),
        (65, 65, 16, 0, 1.0, 0.0),
        (48, 96, 40, 32, 30.0, 5.0),
    ],
)
def test_sigmoid_loss_fp32_matches_fp64(n, m, d, off, scale, bias):
    q, k = _pairs(n, m, d, off, seed=n)
    _check(q, k, scale, bias, off, rtol=2e-5)


@in_process
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_sigmoid_loss_16bit(dtype, rtol):
    # The oracle sees the same 16-bit values: only the output rounding is left.
    q, k = _pairs(40, 90, 72, 50, dtype=dtype, seed=3)
    ours = _check(q, k, 10.0, -10.0, 50, rtol=rtol)
    assert all(torch.isfinite(t).all() for t in ours)


@in_process
def test_saturated_positives_keep_their_gradient():
    # Orthonormal keys, queries next to their positives: x ~ +20 on the labels, ~ -30
    # elsewhere. sigmoid(20) rounds to 1 in fp32, so a gradient formed as sigmoid(x) - 1
    # (or a loss as softplus(x) - x) would be 0 where the truth is ~2e-9, the dominant term.
    g = torch.Generator().manual_seed(4)
    k = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0][:40]
    q = F.normalize(k[10:30] + 0.02 * torch.randn(20, 64, generator=g, dtype=torch.float64), dim=-1)
    ours = _check(q.float(), k.float(), 50.0, -30.0, 10, rtol=2e-5)
    assert 1e-9 < ours[0].item() < 1e-8, "the set-up should saturate the positives"


@in_process
def test_every_backward_schedule_gives_the_same_result(monkeypatch):
    # A tiny workspace forces chunking: the two-pass schedule, then one pass with an
    # fp32 accumulator; both must equal the single-chunk result (and the oracle).
    import kernels.gradient_gemms as gg

    q, k = _pairs(37, 100, 40, 50, seed=5)
    base, _ = loss_and_grads(sigmoid_loss, q, k, 20.0, -5.0, 50, device=DEVICE)
    monkeypatch.setattr(gg, "GRAD_WORKSPACE_BYTES", 1)
    for schedule in ("two_pass", "one_pass"):
        monkeypatch.setenv(gg.SCHEDULE_ENV, schedule)
        assert gg.choose_schedule(37, 100, 40, torch.float32, 32, 32)[0] == schedule
        chunked = _check(q, k, 20.0, -5.0, 50, rtol=2e-5)
        for a, b in zip(base, chunked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@in_process
def test_gradients_come_from_the_forwards_one_pass_and_backward_recomputes_nothing(monkeypatch):
    # The loss is a scalar: the forward makes the gradients for grad = 1 in the pass that sums
    # the loss, the backward only scales them (before, the forward's pass over every tile was
    # done again in the backward). Under no_grad the forward only sums the loss.
    import triton

    import kernels.sigmoid_tiles as st
    from kernels.runtime import tile_config

    launches, made = [], []

    def recorded(name, kernel):
        class Launch:
            def __getitem__(self, grid):
                launches.append((phase, name, grid[0] * (grid[1] if len(grid) > 1 else 1)))
                return kernel[grid]

        return Launch()

    def kept(*args, **kwargs):
        out = real_grads(*args, **kwargs)
        made.append(out[0].data_ptr())  # not the tensor: a reference kept here forces a copy
        return out

    real_grads = st.sigmoid_grads
    monkeypatch.setattr(st, "_sigmoid_fwd_kernel", recorded("fwd", st._sigmoid_fwd_kernel))
    monkeypatch.setattr(st, "_sigmoid_grad_kernel", recorded("grad", st._sigmoid_grad_kernel))
    monkeypatch.setattr(st, "sigmoid_grads", kept)
    n, m, d, off = 20, 70, 24, 30
    q, k = (t.to(DEVICE) for t in _pairs(n, m, d, off, seed=8))
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    phase = "forward"
    loss = sigmoid_loss(qa, ka, 10.0, -10.0, label_offset=off)
    phase = "backward"
    loss.backward()
    cfg = tile_config("sig_grad", q, n, m, d)
    tiles = triton.cdiv(n, cfg.BM) * triton.cdiv(m, cfg.BN)
    assert launches == [("forward", "grad", tiles)], launches  # each tile once, in the forward
    assert qa.grad.data_ptr() == made[0], "dq was copied on its way to .grad"
    launches.clear()
    phase = "no_grad"
    with torch.no_grad():
        plain = sigmoid_loss(qa, ka, 10.0, -10.0, label_offset=off)
    assert [name for _, name, _ in launches] == ["fwd"], launches
    torch.testing.assert_close(plain, loss.detach(), rtol=1e-6, atol=0.0)


@in_process
def test_a_second_backward_through_the_graph_recomputes_the_same_gradients():
    q, k = _pairs(30, 45, 24, 10, seed=9)
    qa, ka = (t.to(DEVICE).requires_grad_() for t in (q, k))
    sa = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    loss = sigmoid_loss(qa, ka, sa, -10.0, label_offset=10)
    (loss * 1.7).backward(retain_graph=True)
    first = [t.grad.clone() for t in (qa, ka, sa)]
    (loss * 1.7).backward()
    for a, t in zip(first, (qa, ka, sa)):
        torch.testing.assert_close(t.grad, 2 * a, rtol=1e-5, atol=1e-8)


@in_process
def test_deterministic_and_sharded_sum():
    # Bitwise equal runs; and W shards with offsets r * n sum to the whole problem
    # (each shard's loss is divided by its own n rows).
    world, n = 3, 13
    q, k = _pairs(world * n, world * n, 24, 0, seed=6)
    first, _ = loss_and_grads(sigmoid_loss, q, k, 10.0, -3.0, 0, device=DEVICE)
    second, _ = loss_and_grads(sigmoid_loss, q, k, 10.0, -3.0, 0, device=DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    kk = k.to(DEVICE).requires_grad_()
    total = sum(
        sigmoid_loss(q[r * n : (r + 1) * n].to(DEVICE), kk, 10.0, -3.0, label_offset=r * n)
        for r in range(world)
    )
    torch.testing.assert_close(total.detach().double().cpu() / world, first[0], rtol=1e-5, atol=1e-6)


def test_fallback_and_bad_inputs():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="label_offset"):
        sigmoid_loss(q, k, 1.0, 0.0, label_offset=3)
    with pytest.raises(ValueError, match="embedding size"):
        sigmoid_loss(q, torch.randn(6, 9), 1.0, 0.0)
    # The reference is open_clip's SigLipLoss formula.
    expected = open_clip_siglip_loss(q, k, 2.0, -1.0, label_offset=2)
    torch.testing.assert_close(sigmoid_loss_reference(q, k, 2.0, -1.0, label_offset=2), expected)


@in_process
def test_fp16_gradients_keep_the_loss_scale():
    """fp16 training multiplies the loss by a scale (DeepSpeed's dynamic scale starts at 2^16) so
    that small gradients stay out of fp16's subnormals. The fused path made the gradients for
    grad = 1 in the forward and multiplied the stored fp16 values by the scale afterwards, so the
    scale changed nothing (here: 34 of the small entries exactly 0 either way, p90 relative error
    2.6e-2). fp16 now recomputes in the backward with the upstream gradient folded in (11 zeros,
    1.4e-2 at 2^16; the torch reference in fp16: 0 zeros, 1.2e-2)."""
    g = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(128, 64, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(k + 0.02 * torch.randn(128, 64, generator=g, dtype=torch.float64), dim=1)
    truth = q.clone().requires_grad_()
    sigmoid_loss_reference(truth, k, 40.0, -20.0).backward()
    small = truth.grad.abs() < 6.1e-5  # below fp16's normal range
    assert small.sum() > 1000, "the set-up should make many small gradient entries"

    def small_entries(loss_scale):
        ours = q.half().to(DEVICE).requires_grad_()
        (sigmoid_loss(ours, k.half().to(DEVICE), 40.0, -20.0) * loss_scale).backward()
        dq = ours.grad.double().cpu() / loss_scale
        rel = ((dq - truth.grad).abs() / truth.grad.abs())[small]
        return int((dq[small] == 0).sum()), rel.quantile(0.9).item()

    zeros_1, p90_1 = small_entries(1.0)
    zeros_scaled, p90_scaled = small_entries(65536.0)
    assert zeros_scaled <= zeros_1 // 2 and p90_scaled < 0.7 * p90_1, (
        zeros_1,
        p90_1,
        zeros_scaled,
        p90_scaled,
    )


@in_process
def test_negative_scale_in_fp16_gives_finite_gradients():
    """The fp16 workspace's power-of-two pre-scale was bounded by scale * |g|: a negative scale
    made the bound negative and the pre-scale 2^60, and every gradient NaN."""
    q, k = _pairs(20, 40, 32, 5, dtype=torch.float16, seed=11)
    ours = _check(q, k, -5.0, -1.0, 5, rtol=2e-3)
    assert all(torch.isfinite(t).all() for t in ours)
