"""kernels.contrastive_ce / kernels.clip_loss against an fp64 torch oracle.

Runs the Triton kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1,
set here before Triton is imported) or on CUDA when a GPU exists. If another test
module imported Triton first without the interpreter, this module re-runs itself
in a fresh process (test_rerun_in_fresh_interpreter) instead of testing the
torch fallback by mistake. Expected runtime: ~1 min on 2 CPU cores.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import subprocess
import sys
import warnings

import pytest
import torch.nn.functional as F

import kernels
from kernels import clip_loss, contrastive_ce
from kernels.reference import clip_loss_reference, contrastive_ce_reference, sigmoid_loss_reference
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


def _features(n, d, dtype=torch.float32, seed=0, scale_rows=1.0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) * scale_rows).to(dtype)


def _ours_and_ref(op, q, k, scale, **kw):
    """Loss and grads (q, k, scale) from the kernel on DEVICE and from the fp64 oracle."""
    qa, ka = (x.to(DEVICE).detach().requires_grad_() for x in (q, k))
    sa = torch.tensor(float(scale), device=DEVICE, requires_grad=True)
    ours = op(qa, ka, sa, **kw)
    assert ours.grad_fn is not None and "Function" in type(ours.grad_fn).__name__, "kernel path not taken"
    weights = torch.linspace(0.5, 1.5, ours.numel(), device=DEVICE).reshape(ours.shape)
    (ours * weights).sum().backward()
    qr, kr = (x.detach().double().requires_grad_() for x in (q, k))
    sr = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    ref_op = contrastive_ce_reference if op is contrastive_ce else clip_loss_reference
    ref = ref_op(qr, kr, sr, **kw)
    (ref * weights.double().cpu().reshape(ref.shape)).sum().backward()
    return (ours, qa.grad, ka.grad, sa.grad), (ref, qr.grad, kr.grad, sr.grad)


def _assert_close(ours, ref, rtol, atol=0.0):
    """Each output within rtol of the oracle (relative to the oracle's largest magnitude) + atol."""
    for name, a, b in zip(("loss", "d_queries", "d_keys", "d_scale"), ours, ref):
        a = a.detach().double().cpu()
        err = (a - b).abs().max().item()
        bound = rtol * b.abs().max().item() + atol
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


SHAPES = [  # (N, M, D, label_offset): ragged, below/above one tile, D not a multiple of BD
    (1, 1, 16, 0),
    (7, 48, 24, 41),
    (37, 111, 130, 70),
    (48, 96, 40, 32),
    (65, 65, 16, 0),
]


@in_process
@pytest.mark.parametrize("n,m,d,off", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_contrastive_ce_fp32_matches_fp64(n, m, d, off, scale):
    q, k = _features(n, d, seed=1), _features(m, d, seed=2)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, scale, label_offset=off)
    _assert_close(ours, ref, rtol=2e-5)


@in_process
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_contrastive_ce_reductions(reduction):
    q, k = _features(33, 40, seed=3), _features(70, 40, seed=4)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 20.0, label_offset=37, reduction=reduction)
    assert ours[0].shape == ref[0].shape
    _assert_close(ours, ref, rtol=2e-5)


@in_process
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_16bit_inputs(dtype, rtol, scale):
    # The oracle sees the same 16-bit values (in fp64): the kernels accumulate in fp32,
    # so only the output rounding (grads stored in the input dtype) is left.
    q, k = _features(40, 72, dtype, seed=5), _features(90, 72, dtype, seed=6)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, scale, label_offset=50)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    _assert_close(ours, ref, rtol=rtol)
    ours, ref = _ours_and_ref(clip_loss, q[:40], k[:40], scale)
    _assert_close(ours, ref, rtol=rtol)


@in_process
def test_fp16_small_gradients_survive_the_fp16_workspace():
    # The gradient GEMMs run in fp16 for fp16 inputs. With a small upstream gradient the
    # logit gradients (~3e-8 here) lie below fp16's smallest subnormal (6e-8): without
    # the power-of-two pre-scale of the workspace they would flush to zero. The returned
    # fp16 gradients (~1e-6) are subnormal themselves: allowed one fp16 subnormal step.
    q, k = _features(40, 72, torch.float16, seed=5), _features(90, 72, torch.float16, seed=6)
    qa, ka = (x.to(DEVICE).detach().clone().requires_grad_() for x in (q, k))
    (contrastive_ce(qa, ka, 1.0, label_offset=50) * 1e-4).backward()
    qr, kr = (x.detach().double().requires_grad_() for x in (q, k))
    (contrastive_ce_reference(qr, kr, 1.0, label_offset=50) * 1e-4).backward()
    for a, b in ((qa.grad, qr.grad), (ka.grad, kr.grad)):
        err = (a.double().cpu() - b).abs().max().item()
        assert err <= 2e-3 * b.abs().max().item() + 2.0**-24, (
            f"max error {err:.3g} vs largest {b.abs().max().item():.3g}"
        )


def _torch_same_dtype(op, q, k, scale, **kw):
    """Loss and grads of the plain-torch op run in the inputs' own dtype (the baseline)."""
    ref_op = contrastive_ce_reference if op is contrastive_ce else clip_loss_reference
    qt, kt = (x.detach().clone().requires_grad_() for x in (q, k))
    st = torch.tensor(float(scale), requires_grad=True)
    out = ref_op(qt, kt, st, **kw)
    out.sum().backward()
    return out, qt.grad, kt.grad, st.grad


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_one_hot_rows_no_worse_than_torch(dtype):
    # Positives close to their queries at s=100: P_ii = 1 - ~1e-3, which rounds to 1 in
    # bf16, so the label term must be formed in fp32 or those rows lose their gradient.
    # Criterion (as in apple/ml-cross-entropy): error vs fp64 no worse than torch's own
    # error in the same dtype, plus a small margin.
    k = _features(64, 32, seed=7).double()
    q = F.normalize(k[16:48] + 1.2 * _features(32, 32, seed=8).double(), dim=-1)
    q, k = q.to(dtype), k.to(dtype)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 100.0, label_offset=16, reduction="sum")
    base = _torch_same_dtype(contrastive_ce, q, k, 100.0, label_offset=16, reduction="sum")
    assert 1e-5 < ref[0].item() < 0.1, "the set-up should give near-one-hot rows"
    for name, a, b, t in zip(("loss", "d_queries", "d_keys", "d_scale"), ours, ref, base):
        err = (a.detach().double().cpu() - b).abs().max().item()
        err_torch = (t.detach().double() - b).abs().max().item()
        margin = 1e-3 * b.abs().max().item() if dtype == torch.bfloat16 else 1e-5 * b.abs().max().item()
        assert err <= err_torch + margin, f"{name}: ours {err:.3g} vs torch-{dtype} {err_torch:.3g}"


@in_process
def test_duplicate_and_equal_columns():
    k = _features(50, 24, seed=9)
    k[10:20] = k[0]  # ten identical columns, label columns among them
    q = k[5:30].clone()
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 50.0, label_offset=5)
    # True gradients are ~0 here (they cancel); fp32 leaves ~1e-8 of noise.
    _assert_close(ours, ref, rtol=2e-5, atol=1e-6)
    zeros = torch.zeros(20, 24)  # all logits equal: loss = log M exactly
    ours, ref = _ours_and_ref(clip_loss, zeros, zeros, 10.0)
    _assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    assert abs(ours[0].item() - torch.log(torch.tensor(20.0)).item()) < 1e-5


@in_process
def test_unnormalised_features():
    q, k = _features(30, 20, seed=10, scale_rows=3.0), _features(45, 20, seed=11, scale_rows=3.0)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 5.0, label_offset=15)
    _assert_close(ours, ref, rtol=2e-5)


@in_process
def test_sharded_sum_equals_whole():
    # W ranks each score their own rows against all columns with offset r*n:
    # the sum over shards must be the whole problem, loss and gradients.
    world, n, d = 3, 21, 40
    img, txt = _features(world * n, d, seed=12), _features(world * n, d, seed=13)
    txt_all = txt.clone().to(DEVICE).requires_grad_()
    shards = [img[r * n : (r + 1) * n].clone().to(DEVICE).requires_grad_() for r in range(world)]
    total = sum(
        contrastive_ce(shards[r], txt_all, 30.0, label_offset=r * n, reduction="sum") for r in range(world)
    )
    total.backward()
    img_w = img.clone().to(DEVICE).requires_grad_()
    txt_w = txt.clone().to(DEVICE).requires_grad_()
    whole = contrastive_ce(img_w, txt_w, 30.0, reduction="sum")
    whole.backward()
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat([s.grad for s in shards]), img_w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt_all.grad, txt_w.grad, rtol=1e-4, atol=1e-5)


@in_process
@pytest.mark.parametrize("n,d", [(1, 16), (7, 24), (64, 130), (97, 40)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_clip_loss_fp32_matches_fp64(n, d, scale):
    img = _features(n, d, seed=14)
    txt = F.normalize(img.double() + 0.5 * _features(n, d, seed=15).double(), dim=-1).float()
    ours, ref = _ours_and_ref(clip_loss, img, txt, scale)
    # At s=100 these pairs are one-hot to 1e-16: an absolute floor for fp32 noise.
    _assert_close(ours, ref, rtol=2e-5, atol=1e-7)


@in_process
def test_bounded_workspaces_give_the_same_result(monkeypatch):
    # Tiny workspace caps force the row-chunked forward (column partials) and the
    # multi-chunk backward; column splits are forced too. Results must not change.
    import kernels.gradient_gemms as gb
    import kernels.lse_forward as lf

    img, txt = _features(100, 48, seed=16), _features(100, 48, seed=17)
    base, _ = _ours_and_ref(clip_loss, img, txt, 30.0)
    monkeypatch.setattr(lf, "COL_WORKSPACE_BYTES", 1)
    monkeypatch.setattr(gb, "GRAD_WORKSPACE_BYTES", 1)  # one row/column block per chunk
    orig = lf._column_splits
    monkeypatch.setattr(lf, "_column_splits", lambda rb, m, bn, dev, cs: orig(rb, m, bn, dev, 3))
    chunked, ref = _ours_and_ref(clip_loss, img, txt, 30.0)
    _assert_close(chunked, ref, rtol=2e-5)
    for a, b in zip(base, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Gathered shape (N < M), labels crossing chunk borders: the two-pass schedule,
    # then the accumulate schedule (column chunks, fp32 [N, D] buffer).
    q, k = _features(37, 40, seed=22), _features(111, 40, seed=23)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 30.0, label_offset=50)
    _assert_close(ours, ref, rtol=2e-5)
    monkeypatch.setattr(gb, "ACCUMULATE_MIN_CHUNK", 1)
    ours, ref = _ours_and_ref(contrastive_ce, q, k, 30.0, label_offset=50)
    _assert_close(ours, ref, rtol=2e-5)
    accumulated, ref = _ours_and_ref(clip_loss, img, txt, 30.0)  # row chunks, fp32 [M, D] buffer
    _assert_close(accumulated, ref, rtol=2e-5)


@in_process
def test_deterministic_bitwise():
    q, k = _features(50, 40, seed=18), _features(120, 40, seed=19)
    runs = [_ours_and_ref(contrastive_ce, q, k, 40.0, label_offset=60)[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@in_process
def test_python_float_scale_and_no_grad():
    q, k = _features(10, 16, seed=20).to(DEVICE), _features(10, 16, seed=21).to(DEVICE)
    with torch.no_grad():
        out = clip_loss(q, k, 10.0)
    ref = clip_loss_reference(q.double().cpu(), k.double().cpu(), 10.0)
    assert abs(out.item() - ref.item()) < 1e-5


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="label_offset"):
        contrastive_ce(q, k, 1.0, label_offset=3)
    with pytest.raises(ValueError, match="embedding size"):
        contrastive_ce(q, torch.randn(6, 9), 1.0)
    with pytest.raises(ValueError, match="as many images as texts"):
        clip_loss(q, k, 1.0)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_ce(q, k, 1.0, reduction="max")
    # Two devices (cuda:0 and cuda:1 on a GPU host; CPU and meta here): the Triton path would
    # launch one kernel with pointers into both devices' memory.
    with pytest.raises(ValueError, match="same device"):
        contrastive_ce(q, torch.randn(6, 8, device="meta"), 1.0)
    with pytest.raises(ValueError, match="same device"):
        clip_loss(q, torch.randn(4, 8, device="meta"), 1.0)
    with pytest.raises(ValueError, match="same device"):
        kernels.sigmoid_loss(q, torch.randn(6, 8, device="meta"), 1.0, 0.0)


def test_import_and_fallback_without_triton():
    # With Triton unimportable, `kernels` still imports and the ops run the torch reference.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "q, k = torch.randn(5, 8, requires_grad=True), torch.randn(9, 8)\n"
        "out = kernels.contrastive_ce(q, k, 3.0, label_offset=2)\n"
        "ref = kernels.reference.contrastive_ce_reference(q, k, 3.0, label_offset=2)\n"
        "assert torch.equal(out, ref); out.backward()\n"
        "print(kernels.clip_loss(q, k[:5], 2.0).item())\n"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_triton_available_matches_mode():
    assert kernels.triton_available() == (MODE in ("gpu", "interpreter") or torch.cuda.is_available())


@in_process
def test_every_launch_runs_under_a_guard_for_the_inputs_device(monkeypatch):
    # Triton launches on torch's *current* CUDA device and its stream, not on the inputs'
    # device: features on cuda:1 with cuda:0 current would fault (or race cuda:1's stream).
    # Each op must make its inputs' device current around forward and backward and launch
    # every kernel inside. The real guard is a no-op on CPU, so a recording one stands in.
    import contextlib
    import importlib

    import kernels.grad_backward as gb
    import kernels.lse_forward as lf
    import kernels.sigmoid_tiles as st

    # Not `import kernels.clip_loss as cl`: the package's function of that name shadows the module.
    ce, cl, sl = (
        importlib.import_module(f"kernels.{m}") for m in ("contrastive_ce", "clip_loss", "sigmoid_loss")
    )

    active = []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for mod in (ce, cl, sl):
        monkeypatch.setattr(mod, "device_guard", guard)
    launches = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, list(active)))
            return self.kernel[grid]

    names = ("_lse_fwd_kernel", "_grad_chunk_kernel", "_sigmoid_fwd_kernel", "_sigmoid_grad_kernel")
    for mod, name in zip((lf, gb, st, st), names):
        monkeypatch.setattr(mod, name, Recorded(name, getattr(mod, name)))
    q = _features(20, 16, seed=26).to(DEVICE).requires_grad_()
    k = _features(40, 16, seed=27).to(DEVICE).requires_grad_()
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    clip_loss(q, k[:20], scale).backward()
    contrastive_ce(q, k, scale, label_offset=5).backward()
    bias = torch.tensor(-3.0, device=DEVICE)
    kernels.sigmoid_loss(q, k, scale, bias, label_offset=5).backward()  # one pass, in the forward
    with torch.no_grad():  # the loss alone: the other kernel
        kernels.sigmoid_loss(q, k, scale, bias, label_offset=5)
    assert {name for name, _ in launches} == set(names)
    assert all(guards == [q.device] for _, guards in launches), launches


@in_process
@pytest.mark.parametrize("frozen", ["queries", "keys"])
def test_a_locked_towers_features_cost_no_gradient_gemm(monkeypatch, frozen):
    # model.lock_image: the image features need no gradient, and autograd discards what the
    # backward returns for them; ctx.needs_input_grad lets the ops skip those GEMMs. Each op
    # then runs one N x M x D gradient product per wanted side, and the rest stays exact.
    import kernels.gradient_gemms as gg

    macs = []
    mm_into = gg._mm_into

    def counted(out, a, b):
        macs.append(a.shape[0] * a.shape[1] * b.shape[1])
        mm_into(out, a, b)

    monkeypatch.setattr(gg, "_mm_into", counted)
    n, m, d = 24, 56, 32
    q, k = _features(n, d, seed=28).to(DEVICE), _features(m, d, seed=29).to(DEVICE)
    bias = torch.tensor(-2.0, device=DEVICE)
    ops = {
        "contrastive_ce": (
            lambda a, b, s: contrastive_ce(a, b, s, label_offset=9),
            lambda a, b, s: contrastive_ce_reference(a, b, s, label_offset=9),
            (n, m),
        ),
        "clip_loss": (clip_loss, clip_loss_reference, (n, n)),
        "sigmoid_loss": (
            lambda a, b, s: kernels.sigmoid_loss(a, b, s, bias, label_offset=9),
            lambda a, b, s: sigmoid_loss_reference(a, b, s, bias.double().cpu(), label_offset=9),
            (n, m),
        ),
    }
    for name, (op, ref_op, (rows, cols)) in ops.items():
        kk = k[:cols]
        trained = kk if frozen == "queries" else q
        qa, ka = (x.detach().requires_grad_(x is trained) for x in (q, kk))
        scale = torch.tensor(20.0, device=DEVICE, requires_grad=True)
        macs.clear()
        op(qa, ka, scale).backward()
        assert sum(macs) == rows * cols * d, (name, macs)
        qr, kr = (x.detach().double().cpu().requires_grad_(x is trained) for x in (q, kk))
        sr = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
        ref_op(qr, kr, sr).backward()
        ours, ref = (ka.grad, kr.grad) if frozen == "queries" else (qa.grad, qr.grad)
        assert (qa.grad is None) == (frozen == "queries") and (ka.grad is None) == (frozen == "keys")
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scale.grad.double().cpu(), sr.grad, rtol=1e-4, atol=1e-6)


def test_gradient_launch_grids_fit_cudas_grid_limits(monkeypatch):
    # CUDA takes at most 65535 blocks along grid axes 1 and 2 (2^31 - 1 along axis 0). One
    # query row against a 9M-row gallery made (1, 65536) grids at BN = 128: "invalid
    # argument" at launch on a GPU, unseen by the interpreter. Meta tensors stand in for
    # the 9M rows (no data), the launches are recorded, not run, with the H100 tile table.
    import triton

    import kernels.grad_backward as gb
    import kernels.sigmoid_tiles as st
    from kernels import tile_configs
    from kernels.lse_forward import LseStats

    grids = []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda **kwargs: None

    monkeypatch.setattr(gb, "_grad_chunk_kernel", Recorded())
    monkeypatch.setattr(st, "_sigmoid_grad_kernel", Recorded())
    n, m, d = 1, 9 * 2**20, 512
    q, k = torch.empty(n, d, device="meta"), torch.empty(m, d, device="meta")
    one, row = torch.ones((), device="meta"), torch.zeros(n, device="meta")
    tiles = 0
    for kind in ("ce_grad", "sig_grad"):
        cfg = tile_configs.choose("sm_90", kind, n, m, d, element_size=4)
        with tile_configs.forced(kind, cfg):
            if kind == "ce_grad":
                gb.grad_backward(q, k, one, LseStats(row, row, None), row)
            else:
                st.sigmoid_grads(q, k, one, one, one)
        tiles += triton.cdiv(n, cfg.BM) * triton.cdiv(m, cfg.BN)
    assert grids and all(g <= 65535 for grid in grids for g in grid[1:]), grids
    assert all(grid[0] < 2**31 for grid in grids) and sum(grid[0] for grid in grids) == tiles, grids


def test_ops_fall_back_with_one_warning_where_triton_cannot_compile(monkeypatch):
    # Triton compiles nothing below compute capability 7.0 (the ops failed inside its compiler
    # at the first launch), and bf16 below 8.0 has no tensor cores (an untested FMA path): the
    # ops there take the torch reference and say why, once per (capability, dtype).
    from types import SimpleNamespace

    from kernels import runtime

    monkeypatch.setattr(runtime, "triton_available", lambda: True)
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "_WARNED_UNSUPPORTED", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")

    def on_gpu(dtype):  # what use_triton reads of a CUDA tensor
        return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)

    assert runtime.use_triton(on_gpu(torch.float16), on_gpu(torch.float16))
    with pytest.warns(
        RuntimeWarning, match=r"Tesla T4 has compute capability 7.5, below the 8.0 .* bfloat16"
    ):
        assert not runtime.use_triton(on_gpu(torch.bfloat16), on_gpu(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not runtime.use_triton(on_gpu(torch.bfloat16), on_gpu(torch.bfloat16))  # warned once
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    with pytest.warns(RuntimeWarning, match="loss.backend=torch"):
        assert not runtime.use_triton(on_gpu(torch.float16), on_gpu(torch.float16))


@in_process
def test_fp32_features_under_autocast_run_in_the_autocast_dtype():
    # The torch reference's matmul (and open_clip's loss under amp) runs fp32 features in bf16
    # under autocast; the kernels ran exact fp32 dots there (CUDA cores, many times slower).
    # Now both paths see the same bf16 features; gradients still come back in fp32.
    q, k = _features(24, 64, seed=30).to(DEVICE), _features(40, 64, seed=31).to(DEVICE)
    bias = torch.tensor(-2.0, device=DEVICE)
    ops = {
        "contrastive_ce": lambda a, b: contrastive_ce(a, b, 30.0, label_offset=8),
        "clip_loss": lambda a, b: clip_loss(a, b[:24], 30.0),
        "sigmoid_loss": lambda a, b: kernels.sigmoid_loss(a, b, 30.0, bias, label_offset=8),
    }
    for name, op in ops.items():
        as_bf16 = op(q.bfloat16(), k.bfloat16())
        qa = q.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            ours = op(qa, k)
        assert torch.equal(ours, as_bf16), (name, ours.item(), as_bf16.item(), op(q, k).item())
        ours.backward()
        assert qa.grad.dtype == torch.float32 and torch.isfinite(qa.grad).all(), name


def test_scale_gradient_keeps_the_scale_device_shape_and_dtype():
    # Autograd moves a 0-dim gradient to its input's device but rejects a [1]-shaped one on
    # another device: a CPU fp16 logit_scale of shape [1] with CUDA features needs its
    # gradient back on the CPU. The meta device stands in for "not the features' device".
    from kernels.contrastive_ce import grad_like, scale_meta

    scale = torch.ones(1, dtype=torch.float16, device="meta")
    out = grad_like(torch.tensor(2.0), scale_meta(scale))
    assert (out.shape, out.dtype, out.device) == (scale.shape, scale.dtype, scale.device)
    assert scale_meta(3.0) is None and grad_like(torch.tensor(2.0), None) is None


@in_process
def test_never_allocates_logits_sized_tensors(monkeypatch):
    # Every tensor torch creates during forward + backward (workspaces, partials,
    # gradients) must stay well below N x M once the workspaces are capped small.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import kernels.gradient_gemms as gb
    import kernels.lse_forward as lf

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # In-place ops allocate nothing; the interpreter's own host copies move
            # storages as raw bytes (uint8), which are not our allocations either.
            if not func.__name__.split(".")[0].endswith("_"):
                sizes = [
                    t.numel()
                    for t in tree_leaves(out)
                    if isinstance(t, torch.Tensor) and t.is_floating_point()
                ]
                self.numel = max([self.numel, *sizes])
            return out

    monkeypatch.setattr(lf, "COL_WORKSPACE_BYTES", 16 * 1024)
    monkeypatch.setattr(gb, "GRAD_WORKSPACE_BYTES", 16 * 1024)
    n = 256
    img = _features(n, 32, seed=24).to(DEVICE).requires_grad_()
    txt = _features(n, 32, seed=25).to(DEVICE).requires_grad_()
    scale = torch.tensor(50.0, device=DEVICE, requires_grad=True)
    with LargestTensor() as mode:
        clip_loss(img, txt, scale).backward()
        contrastive_ce(img, txt, scale, label_offset=0).backward()
    assert img.grad is not None and scale.grad is not None
    assert 0 < mode.numel <= n * n // 4, f"a tensor of {mode.numel} elements (N x M = {n * n})"


@in_process
def test_interpreter_scalars_index_with_numpy_2(monkeypatch):
    """Triton 3.6's interpreter made ``range(pid * BM, ...)`` fail under numpy 2.4 (``int()``
    of a one-element 1-D array); ``runtime`` patches ``__index__`` the way Triton 3.9 does."""
    if MODE != "interpreter":
        pytest.skip("the interpreter is not active")
    import numpy as np
    import triton.runtime.interpreter as interp

    from kernels import runtime

    def triton_3_6_patch(tensor, scope):  # what Triton 3.6 installs
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Handle:
        data = np.array([7], dtype=np.int32)

    class Scalar:
        handle = Handle()

    monkeypatch.setattr(interp, "_patch_lang_tensor", triton_3_6_patch)
    runtime._patch_scalar_index.cache_clear()
    runtime._patch_scalar_index()
    interp._patch_lang_tensor(Scalar, Scope())
    assert list(range(Scalar(), 9)) == [7, 8]
    runtime._patch_scalar_index.cache_clear()


@in_process
def test_float64_inputs_take_the_reference_and_stay_float64():
    """fp64 (the oracle's dtype) is not a kernel dtype: compiled, an fp64 tile fails to build,
    and under the interpreter it was upcast to fp32 and gave an fp32 loss (error ~4e-7)."""
    q = F.normalize(torch.randn(12, 16, dtype=torch.float64), dim=-1).to(DEVICE).requires_grad_()
    k = F.normalize(torch.randn(12, 16, dtype=torch.float64), dim=-1).to(DEVICE)
    out = kernels.clip_loss(q, k, 20.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, clip_loss_reference(q, k, 20.0), rtol=0, atol=1e-12)
    out.backward()
    assert q.grad.dtype == torch.float64
    sig = kernels.sigmoid_loss(q.detach(), k, 10.0, -10.0)
    assert sig.dtype == torch.float64
