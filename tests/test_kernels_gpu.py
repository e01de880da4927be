"""The kernels (softmax and sigmoid losses) on a real GPU: bf16 accuracy against an
fp32/fp64 oracle, large shapes, bitwise determinism. Marked ``gpu``; skipped without CUDA.

Criterion (as in apple/ml-cross-entropy): the kernels' error against the oracle is
no worse than plain torch's error in the same dtype, plus a stated margin (MARGIN
times the oracle's largest magnitude, plus 1e-6 absolute).
Run: ``python -m pytest -q -m gpu tests/test_kernels_gpu.py`` (about 1 min on an H100).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Margin added to torch-same-dtype's error, relative to the oracle's largest magnitude.
MARGIN = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def _features(n, d, dtype, seed, correlate_with=None, noise=0.7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g)
    if correlate_with is not None:
        x = correlate_with.float() + noise * F.normalize(x, dim=-1)
    return F.normalize(x, dim=-1).to(dtype)


def _run(op, q, k, scale, upcast=None, **kw):
    qa = (q if upcast is None else q.to(upcast)).detach().requires_grad_()
    ka = (k if upcast is None else k.to(upcast)).detach().requires_grad_()
    sa = torch.tensor(scale, device="cuda", requires_grad=True)
    out = op(qa, ka, sa, **kw)
    out.backward()
    return [out.detach().double(), qa.grad.double(), ka.grad.double(), sa.grad.double()]


def _check(op, ref_op, q, k, scale, **kw):
    dtype = q.dtype
    ours = _run(op, q, k, scale, **kw)
    oracle = _run(ref_op, q, k, scale, upcast=torch.float64, **kw)
    torch_same = _run(ref_op, q, k, scale, **kw)
    for name, a, b, t in zip(("loss", "d_q", "d_k", "d_scale"), ours, oracle, torch_same):
        err, err_torch = (a - b).abs().max().item(), (t - b).abs().max().item()
        # + 1e-6 absolute: at s=100 these rows are one-hot, so some outputs are ~0.
        bound = err_torch + MARGIN[dtype] * b.abs().max().item() + 1e-6
        assert err <= bound, f"{name} ({dtype}): ours {err:.3g}, torch {err_torch:.3g}, bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,m,d,off", [(256, 512, 128, 100), (252, 507, 123, 255), (1000, 4096, 768, 3096)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_contrastive_ce_vs_oracle(dtype, n, m, d, off, scale):
    from kernels import contrastive_ce
    from kernels.reference import contrastive_ce_reference

    k = _features(m, d, dtype, seed=1)
    q = _features(n, d, dtype, seed=2, correlate_with=k[off : off + n])
    _check(contrastive_ce, contrastive_ce_reference, q, k, scale, label_offset=off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d", [(300, 123), (2048, 512)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_clip_loss_vs_oracle(dtype, n, d, scale):
    from kernels import clip_loss
    from kernels.reference import clip_loss_reference

    img = _features(n, d, dtype, seed=3)
    txt = _features(n, d, dtype, seed=4, correlate_with=img)
    _check(clip_loss, clip_loss_reference, img, txt, scale)


def test_large_square_bf16_against_fp32():
    # 16k^2 fp32 logits (1 GiB) still fit for the oracle; the kernels never build them.
    from kernels import clip_loss
    from kernels.reference import clip_loss_reference

    img = _features(16384, 768, torch.bfloat16, seed=5)
    txt = _features(16384, 768, torch.bfloat16, seed=6, correlate_with=img)
    ours = _run(clip_loss, img, txt, 100.0)
    oracle = _run(clip_loss_reference, img, txt, 100.0, upcast=torch.float32)
    torch_same = _run(clip_loss_reference, img, txt, 100.0)
    for name, a, b, t in zip(("loss", "d_img", "d_txt", "d_scale"), ours, oracle, torch_same):
        err, err_torch = (a - b).abs().max().item(), (t - b).abs().max().item()
        bound = err_torch + 1e-2 * b.abs().max().item() + 1e-6
        assert err <= bound, f"{name}: ours {err:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("n,m,d", [(4096, 4096, 768), (1024, 16384, 512)])
def test_bitwise_deterministic(n, m, d):
    from kernels import clip_loss, contrastive_ce

    k = _features(m, d, torch.bfloat16, seed=7)
    q = _features(n, d, torch.bfloat16, seed=8, correlate_with=k[m - n :])
    op = clip_loss if n == m else (lambda a, b, s: contrastive_ce(a, b, s, label_offset=m - n))
    first, second = _run(op, q, k, 50.0), _run(op, q, k, 50.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_logits_sized_allocation():
    # Peak extra memory of fwd+bwd (beyond the gradients it returns) stays far below
    # one N x M bf16 logits matrix: workspaces are bounded.
    from kernels import clip_loss

    n, d = 16384, 768
    img = _features(n, d, torch.bfloat16, seed=9).requires_grad_()
    txt = _features(n, d, torch.bfloat16, seed=10).requires_grad_()
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    clip_loss(img, txt, scale).backward()  # compile outside the measurement
    img.grad = txt.grad = scale.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clip_loss(img, txt, scale).backward()
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (img, txt, scale))
    extra = torch.cuda.max_memory_allocated() - base - grads  # the returned gradients are outputs
    assert extra < n * n * 2 / 4, f"peak extra {extra / 2**20:.0f} MiB beyond the gradients"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,m,d,off", [(256, 512, 128, 100), (1000, 4096, 768, 3096)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -5.0)])
def test_sigmoid_loss_vs_oracle(dtype, n, m, d, off, scale, bias):
    from kernels import sigmoid_loss
    from kernels.reference import sigmoid_loss_reference

    k = _features(m, d, dtype, seed=11)
    q = _features(n, d, dtype, seed=12, correlate_with=k[off : off + n])

    def run(op, upcast=None):
        qa = (q if upcast is None else q.to(upcast)).detach().requires_grad_()
        ka = (k if upcast is None else k.to(upcast)).detach().requires_grad_()
        sa = torch.tensor(scale, device="cuda", requires_grad=True)
        ba = torch.tensor(bias, device="cuda", requires_grad=True)
        out = op(qa, ka, sa, ba, label_offset=off)
        out.backward()
        return [t.detach().double() for t in (out, qa.grad, ka.grad, sa.grad, ba.grad)]

    ours, oracle, torch_same = (
        run(sigmoid_loss),
        run(sigmoid_loss_reference, torch.float64),
        run(sigmoid_loss_reference),
    )
    for name, a, b, t in zip(("loss", "d_q", "d_k", "d_scale", "d_bias"), ours, oracle, torch_same):
        err, err_torch = (a - b).abs().max().item(), (t - b).abs().max().item()
        bound = err_torch + MARGIN[dtype] * b.abs().max().item() + 1e-6
        assert err <= bound, f"{name} ({dtype}): ours {err:.3g}, torch {err_torch:.3g}, bound {bound:.3g}"


def test_sigmoid_loss_deterministic_and_bounded_memory():
    from kernels import sigmoid_loss

    n, d = 16384, 768
    img = _features(n, d, torch.bfloat16, seed=13)
    # Built from img before img requires grad: both stay leaves, so both get a .grad.
    txt = _features(n, d, torch.bfloat16, seed=14, correlate_with=img).requires_grad_()
    img.requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        img.grad = txt.grad = scale.grad = bias.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = sigmoid_loss(img, txt, scale, bias)
        loss.backward()
        torch.cuda.synchronize()
        grads = sum(t.grad.numel() * t.grad.element_size() for t in (img, txt, scale, bias))
        extra = torch.cuda.max_memory_allocated() - base - grads
        assert extra < 64 * 2**20, f"peak extra {extra / 2**20:.0f} MiB beyond the gradients"
        runs.append(
            [loss.detach(), img.grad.clone(), txt.grad.clone(), scale.grad.clone(), bias.grad.clone()]
        )
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_a_device_that_is_not_current():
    # Triton launches on torch's current device: the ops must switch to the inputs' device
    # (features on cuda:1 while cuda:0 is current used to run on cuda:0 with cuda:1 pointers).
    from kernels import clip_loss, sigmoid_loss
    from kernels.reference import clip_loss_reference, sigmoid_loss_reference

    torch.cuda.set_device(0)
    img = F.normalize(torch.randn(300, 128, device="cuda:1"), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn_like(img), dim=-1)
    for op, ref, extra in (
        (clip_loss, clip_loss_reference, ()),
        (sigmoid_loss, sigmoid_loss_reference, (-5.0,)),
    ):
        outs = []
        for fn in (op, ref):
            a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
            s = torch.tensor([10.0], device="cuda:1", requires_grad=True)  # [1]-shaped scale
            loss = fn(a, b, s, *extra)
            loss.backward()
            outs.append((loss.detach(), a.grad, b.grad, s.grad))
        for x, y in zip(*outs):
            assert x.device == torch.device("cuda:1")
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)


def test_more_column_tiles_than_a_grid_axis_holds():
    # Two query rows against 9M keys: the backward's chunks span 8M columns, 65536 column tiles
    # at BN = 128, one more than CUDA allows along grid axis 1; the 2-D grid failed to launch
    # ("invalid argument"), the flat grid runs. Against torch in fp32 (the N x M logits fit here).
    from kernels import contrastive_ce, sigmoid_loss
    from kernels.reference import contrastive_ce_reference, sigmoid_loss_reference

    n, m, d, off = 2, 9 * 2**20, 64, 5 * 2**20
    k = _features(m, d, torch.bfloat16, seed=21)
    q = _features(n, d, torch.bfloat16, seed=22, correlate_with=k[off : off + n])
    pairs = (
        (
            lambda a, b, s: contrastive_ce(a, b, s, label_offset=off),
            lambda a, b, s: contrastive_ce_reference(a, b, s, label_offset=off),
        ),
        (
            lambda a, b, s: sigmoid_loss(a, b, s, -10.0, label_offset=off),
            lambda a, b, s: sigmoid_loss_reference(a, b, s, -10.0, label_offset=off),
        ),
    )
    for op, ref in pairs:
        got, want = [], []
        for fn, dtype, out in ((op, torch.bfloat16, got), (ref, torch.float32, want)):
            # detach first: q.to(q.dtype) is q itself, and marking it would make the next
            # iteration's casts non-leaves without a .grad
            a, b = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
            s = torch.tensor(10.0, device="cuda", requires_grad=True)
            fn(a, b, s).backward()
            out += [a.grad.float(), b.grad.float(), s.grad.float()]
        for name, x, y in zip(("d_q", "d_k", "d_scale"), got, want):
            err, bound = (x - y).abs().max().item(), 2e-2 * y.abs().max().item() + 1e-6
            assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"
