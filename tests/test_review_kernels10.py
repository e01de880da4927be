"""kernels.sigmoid_loss (SigLIP) against an fp64 oracle written from open_clip's definition (in
sigmoid_cases.py, not kernels.reference), and SigLipLoss(backend="triton") against backend="torch"
in a real 2-rank gloo group.

Under the Triton interpreter on CPU (or on CUDA when a GPU exists); re-runs itself in a fresh
process if Triton was imported before TRITON_INTERPRET=1. Expected runtime: ~40 s on 2 cores.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton; the ranks inherit it

import pytest
import torch.nn.functional as F
from sigmoid_cases import NAMES, assert_matches, loss_and_grads, open_clip_siglip_loss

from kernels import sigmoid_loss
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


def _features(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    return q, k


@in_process
@pytest.mark.parametrize(
    "n, m, d, offset, scale, bias",
    [
        (8, 8, 16, 0, 10.0, -10.0),  # SigLIP's init, one tile
        (5, 37, 33, 7, 10.0, -10.0),  # N != M, neither a multiple of the tile, D not a power of two
        (33, 70, 20, 37, 3.0, 0.5),  # a row block across two column tiles, offset > 0
        (65, 130, 48, 65, 10.0, -10.0),  # rank 1 of 2 with a 65-row local batch; D > the D tile
        (3, 100, 5, 97, 10.0, -10.0),  # the last rank's block: offset = M - N
        (17, 40, 7, 23, 1e4, -3e3),  # |logits| ~ 1e4: log(1 + e^x) past fp32's e^88 overflow
        (9, 9, 3, 0, 1e6, 0.0),  # |logits| ~ 1e6
    ],
)
def test_values_and_all_four_gradients_match_the_fp64_definition(n, m, d, offset, scale, bias):
    q, k = _features(n, m, d)
    ours, _ = loss_and_grads(sigmoid_loss, q, k, scale, bias, offset, device=DEVICE, dtype=torch.float32)
    ref, _ = loss_and_grads(
        open_clip_siglip_loss, q, k, scale, bias, offset, device="cpu", dtype=torch.float64
    )
    assert_matches(ours, ref, rtol=2e-5)


@in_process
@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (1e3, -5.0), (1e6, 3.0)])
@pytest.mark.parametrize("n, m, d, offset", [(10, 10, 16, 0), (65, 200, 48, 65), (3, 300, 5, 297)])
def test_forward_without_gradients_matches_and_stays_finite(scale, bias, n, m, d, offset):
    q, k = _features(n, m, d, seed=1)
    with torch.no_grad():  # the loss-only kernel (per-row partial sums per column split)
        out = sigmoid_loss(q.float().to(DEVICE), k.float().to(DEVICE), scale, bias, label_offset=offset)
    ref = open_clip_siglip_loss(q, k, scale, bias, offset)
    assert torch.isfinite(out)
    assert abs(out.item() - ref.item()) <= 2e-6 * abs(ref.item())


@in_process
@pytest.mark.parametrize("wanted", ["q", "k", "s", "b", "qs", "kb"])
def test_gradients_only_for_the_inputs_that_require_them(wanted):
    q, k = _features(20, 50, 9, seed=2)
    qa = q.float().to(DEVICE).requires_grad_("q" in wanted)
    ka = k.float().to(DEVICE).requires_grad_("k" in wanted)
    sa = torch.tensor(10.0, device=DEVICE, requires_grad="s" in wanted)
    ba = torch.tensor(-10.0, device=DEVICE, requires_grad="b" in wanted)
    (sigmoid_loss(qa, ka, sa, ba, label_offset=30) * 2.0).backward()
    ref, _ = loss_and_grads(
        open_clip_siglip_loss, q, k, 10.0, -10.0, 30, device="cpu", dtype=torch.float64, upstream=2.0
    )
    for key, ours, want in zip("qksb", (qa, ka, sa, ba), ref[1:]):
        if key not in wanted:
            assert ours.grad is None, key
            continue
        err = ((ours.grad.double().cpu() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-5, f"{key}: relative error {err:.2e}"


@in_process
def test_scale_and_bias_as_float_0d_or_one_element_tensor_agree():
    q, k = _features(12, 30, 10, seed=3)
    q, k = q.float().to(DEVICE), k.float().to(DEVICE)
    ref = open_clip_siglip_loss(q.double().cpu(), k.double().cpu(), 10.0, -10.0, 4).item()
    got = [
        sigmoid_loss(q, k, 10.0, -10.0, label_offset=4),
        sigmoid_loss(q, k, torch.tensor(10.0), torch.tensor(-10.0), label_offset=4),
        sigmoid_loss(q, k, torch.tensor([10.0]), torch.tensor([[-10.0]]), label_offset=4),
    ]
    for out in got:
        assert abs(out.item() - ref) <= 2e-6 * abs(ref)
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


@in_process
def test_two_runs_are_bitwise_equal():
    q, k = _features(40, 90, 24, seed=4)
    runs = [
        loss_and_grads(sigmoid_loss, q, k, 10.0, -10.0, 3, device=DEVICE, dtype=torch.float32)[0]
        for _ in range(2)
    ]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name
    with torch.no_grad():
        fwd = [sigmoid_loss(q.float(), k.float(), 10.0, -10.0, label_offset=3) for _ in range(2)]
    assert torch.equal(fwd[0], fwd[1])


@in_process
def test_positives_past_the_keys_are_refused_with_the_valid_range():
    """The API labels every row inside the keys (README: label_offset in [0, M - N]); a key block
    without positives (open_clip's exchanged blocks) is not expressible, and says so."""
    q, k = _features(4, 10, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\]"):
        sigmoid_loss(q.float(), k.float(), 10.0, -10.0, label_offset=7)


LOCAL_BATCH, DIM, WORLD = 24, 40, 2


def _global_features():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g), dim=-1)
    return img, txt


def _rank_worker(rank: int, world_size: int) -> dict:
    import kernels.runtime
    from vutrain.losses import SigLipLoss

    assert kernels.runtime.use_triton(torch.empty(1)), "Triton interpreter not active in the worker"
    img, txt = _global_features()
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out = {}
    for backend in ("torch", "triton"):
        i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        loss = SigLipLoss(rank=rank, world_size=world_size, backend=backend)(i, t, scale, bias)
        loss.backward()
        if backend == "triton":
            assert "SigmoidLoss" in type(loss.grad_fn).__name__, "kernel path not taken"
        out[backend] = {
            "loss": loss.detach(),
            "img": i.grad,
            "txt": t.grad,
            "scale": scale.grad,
            "bias": bias.grad,
        }
    return out


@pytest.mark.slow
@pytest.mark.skipif(MODE == "gpu", reason="gloo ranks on the CPU interpreter")
def test_siglip_triton_matches_torch_and_the_full_batch_on_two_gloo_ranks():
    from helpers_dist import run_distributed

    results = run_distributed(_rank_worker, WORLD, timeout_s=300, env={"TRITON_INTERPRET": "1"})
    for rank, res in enumerate(results):
        for key in ("loss", "img", "txt", "scale", "bias"):
            torch.testing.assert_close(
                res["triton"][key], res["torch"][key], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {key}"
            )
    # One process over the whole batch: the mean of the ranks' losses, and W x each rank's slice
    # of the feature gradients (the gradient all-reduce averages them).
    img, txt = (x.double().requires_grad_() for x in _global_features())
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    full = open_clip_siglip_loss(img, txt, s, b, 0)
    full.backward()
    mean = sum(r["triton"]["loss"].double() for r in results) / WORLD
    assert abs(mean.item() - full.item()) <= 1e-5 * full.item()
    for rank, res in enumerate(results):
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for key, want in (("img", img.grad[sl]), ("txt", txt.grad[sl])):
            got = res["triton"][key].double() / WORLD
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {key}")
    for key, want in (("scale", s.grad), ("bias", b.grad)):
        got = sum(r["triton"][key].double() for r in results) / WORLD
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=key)
