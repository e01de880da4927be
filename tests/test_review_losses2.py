"""The less travelled loss options on an odd world (3 real gloo ranks) against fp64 references
written from the definitions, not from the code under test (no `positive_mask`):

* multi-positive labels as a user of category/tag positives expects them: a positive is a shared
  category or tag, or the sample's own pair; "no label" (-1) is a positive of itself only; the same
  label on two ranks is a positive across ranks; one rank whose batch has no positive beyond
  itself; id-set widths that differ per rank. ClipLoss (local_loss on and off), SigLipLoss
  gathered and ring (bidir, odd world: no last one-way hop), AlignUniformLoss: the mean of the
  per-rank losses is the one-process loss over the global batch, each rank's feature gradient is
  W times that loss's gradient for its slice, and the averaged scale/bias gradients are its own.
* GradCache (2 micro-batches per rank) with these objectives: the rank-averaged parameter
  gradients equal one process's gradients of the whole-batch loss.
* The real Triton kernels (CPU interpreter) inside the distributed ClipLoss / SigLipLoss at
  world 3: same values and gradients as the torch backend.

Two spawns of 3 ranks; about 20 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_dist import run_distributed

WORLD, B, D = 3, 4, 5
SCALE, BIAS = 3.0, -1.0
TOL = dict(rtol=1e-9, atol=1e-12)


# -- data and references (fp64) ----------------------------------------------------------------


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def class_labels() -> list[torch.Tensor]:
    """Rank 0 and 1 share classes 0 and 1 (across ranks); rank 2: unlabelled or unique classes."""
    return [torch.tensor([0, 0, 1, -1]), torch.tensor([1, 2, 2, 0]), torch.tensor([-1, 9, 10, -5])]


def tag_labels() -> list[torch.Tensor]:
    """Id sets padded with -1, width 1, 2, 3 by rank; rank 2 shares no tag with anyone."""
    return [
        torch.tensor([[7], [8], [-1], [7]]),
        torch.tensor([[8, 7], [5, -1], [-1, -1], [5, 5]]),
        torch.tensor([[40, 41, 42], [43, -1, -1], [-1, -1, -1], [44, 45, -1]]),
    ]


def positives(parts: list[torch.Tensor]) -> torch.Tensor:
    """[N, N] from sets: i ~ j when they share a non-negative id, and always i ~ i."""
    sets = [{int(v) for v in row.reshape(-1) if v >= 0} for p in parts for row in p]
    n = len(sets)
    return torch.tensor([[i == j or bool(sets[i] & sets[j]) for j in range(n)] for i in range(n)])


def clip_ref(img, txt, scale, bias, pos):
    logits = scale * img @ txt.T + (0 if bias is None else bias)
    target = pos.double() / pos.double().sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def siglip_ref(img, txt, scale, bias, pos):
    z = pos.double() * 2 - 1
    return -F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / img.shape[0]


def align_uniform_ref(img, txt, scale, bias, pos, t=2.0):
    n = img.shape[0]
    pairs = torch.exp(-t * torch.cdist(img, txt).pow(2)) * (1 - torch.eye(n, dtype=img.dtype))
    return (img - txt).pow(2).sum(1).mean() + torch.log(pairs.sum() / (n * (n - 1)))


# (loss name, build_loss kwargs, labels, reference, takes a bias)
CASES = [
    ("clip", dict(local_loss=True), "class", clip_ref, False),
    ("clip", dict(local_loss=True), "tags", clip_ref, True),
    ("clip", dict(local_loss=False), "class", clip_ref, True),
    ("siglip", dict(), "tags", siglip_ref, True),
    ("siglip", dict(bidir=True), "class", siglip_ref, True),
    ("siglip", dict(bidir=True), "tags", siglip_ref, True),
    ("align_uniform", dict(), None, align_uniform_ref, False),
]
LABELS = {"class": class_labels, "tags": tag_labels}


# -- per-rank work ------------------------------------------------------------------------------


def _loss_grads(rank, world, img, txt):
    from vutrain.losses import build_loss

    rows = slice(rank * B, (rank + 1) * B)
    out = []
    for name, kw, labels, _, with_bias in CASES:
        fn = build_loss(name, rank=rank, world_size=world, **kw)
        x, y = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        extra = {"labels": LABELS[labels]()[rank]} if labels else {}
        loss = fn(x, y, scale, bias if with_bias else None, **extra)
        loss.backward()
        out.append([loss.detach(), x.grad, y.grad, _grad(scale), _grad(bias)])
    return out


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


IN, K = 6, 2  # GradCache: model input width, micro-batches per rank (each B // K rows)


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(IN, D), nn.Linear(IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(1.2))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, y):
        img, txt = F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


class GradsOnly:
    """engine.backward/step without an optimizer: the accumulated gradients stay to compare."""

    def gradient_accumulation_steps(self):
        return K

    def backward(self, loss, scale_wrt_gas=True):
        (loss / K if scale_wrt_gas else loss).backward()

    def step(self):
        pass


GC_CASES = [("clip", dict(), "class"), ("siglip", dict(bidir=True), "tags"), ("align_uniform", dict(), None)]


def _gradcache_grads(rank, world, x_all, y_all):
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import build_loss
    from vutrain.losses.positives import concat_labels

    rows = slice(rank * B, (rank + 1) * B)
    out = []
    for name, kw, labels in GC_CASES:
        model = TwoTower().double()
        fn = build_loss(name, rank=rank, world_size=world, **kw)
        x, y = x_all[rows], y_all[rows]
        extra = {}
        if labels:  # the trainer's way: each micro-batch's labels, concatenated (-1 padded)
            extra["labels"] = concat_labels(list(LABELS[labels]()[rank].chunk(K)))
        gradcache_step(
            GradsOnly(),
            list(zip(x.chunk(K), y.chunk(K))),
            lambda mb, model=model: model(*mb),
            lambda i, t, s, b, fn=fn, extra=extra: fn(i, t, s, b, **extra),
        )
        out.append({n: _grad(p) for n, p in model.named_parameters()})
    return out


def _world3(rank, world, img, txt, x_in, y_in):
    return _loss_grads(rank, world, img, txt), _gradcache_grads(rank, world, x_in, y_in)


@pytest.fixture(scope="module")
def world3():
    img, txt = batch()
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(WORLD * B, IN, generator=g, dtype=torch.float64)
    y_in = torch.randn(WORLD * B, IN, generator=g, dtype=torch.float64)
    return (img, txt, x_in, y_in), run_distributed(_world3, WORLD, img, txt, x_in, y_in)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_odd_world_matches_the_one_process_loss_over_the_global_batch(world3, case):
    """mean_r loss_r == L, grad_r / W == dL/d(slice r), mean_r d loss_r/d(scale, bias) == dL/d(...)."""
    (img, txt, _, _), res = world3
    name, _, labels, ref, with_bias = CASES[case]
    pos = positives(LABELS[labels]()) if labels else torch.eye(WORLD * B, dtype=torch.bool)
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    want = ref(x, y, scale, bias if with_bias else None, pos)
    want.backward()
    per_rank = [r[0][case] for r in res]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / WORLD, want.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / WORLD, x.grad, **TOL)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / WORLD, y.grad, **TOL)
    torch.testing.assert_close(sum(r[3] for r in per_rank) / WORLD, _grad(scale), **TOL)
    torch.testing.assert_close(sum(r[4] for r in per_rank) / WORLD, _grad(bias), **TOL)


def test_reference_labels_do_what_the_cases_claim():
    """The label fixtures hold what the docstring says (so the cases above test those situations)."""
    cls, tags = positives(class_labels()), positives(tag_labels())
    assert cls[0, B + 3] and cls[2, B] and not cls[3, 0]  # across ranks; -1 only itself
    assert (cls[2 * B :].sum(1) == 1).all() and (tags[2 * B :].sum(1) == 1).all()  # rank 2: itself
    assert tags[0, B] and tags[B + 1, B + 3] and not tags[0, 2]  # a shared tag across ranks and within one


@pytest.mark.parametrize("case", range(len(GC_CASES)), ids=[f"{c[0]}-{c[2]}" for c in GC_CASES])
def test_gradcache_across_ranks_equals_the_whole_batch_loss(world3, case):
    """GradCache, 2 micro-batches on each of 3 ranks: the rank-averaged parameter gradients are one
    process's gradients of the loss over all 12 samples (labels concatenated as the trainer does)."""
    (_, _, x_in, y_in), res = world3
    name, kw, labels = GC_CASES[case]
    from vutrain.losses import build_loss
    from vutrain.losses.positives import concat_labels

    model = TwoTower().double()
    extra = {"labels": concat_labels(LABELS[labels]())} if labels else {}
    build_loss(name, rank=0, world_size=1, **kw)(*model(x_in, y_in), **extra).backward()
    for n, p in model.named_parameters():
        got = sum(r[1][case][n] for r in res) / WORLD
        torch.testing.assert_close(got, _grad(p), **TOL, msg=n)


def _triton_vs_torch(rank, world, img, txt):
    from vutrain.losses import ClipLoss, SigLipLoss

    rows = slice(rank * B, (rank + 1) * B)
    out = {}
    for backend in ("torch", "triton"):
        for name, fn, with_bias in (
            ("clip-local", ClipLoss(True, True, rank=rank, world_size=world, backend=backend), False),
            ("clip-global", ClipLoss(False, False, rank=rank, world_size=world, backend=backend), False),
            ("siglip", SigLipLoss(rank=rank, world_size=world, backend=backend), True),
        ):
            x, y = img[rows].float().requires_grad_(), txt[rows].float().requires_grad_()
            scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
            loss = fn(x, y, scale, bias) if with_bias else fn(x, y, scale)
            loss.backward()
            out[(backend, name)] = [loss.detach(), x.grad, y.grad, _grad(scale), _grad(bias)]
    return out


def test_triton_kernels_interpreted_match_torch_on_an_odd_world():
    """Rank offsets of the real kernels (TRITON_INTERPRET=1, fp32) at world 3: values and the
    gradients of features, scale and bias equal the torch backend's."""
    pytest.importorskip("triton")
    img, txt = batch()
    res = run_distributed(_triton_vs_torch, WORLD, img, txt, env={"TRITON_INTERPRET": "1"})
    for rank, r in enumerate(res):
        for name in ("clip-local", "clip-global", "siglip"):
            for got, want in zip(r[("triton", name)], r[("torch", name)]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
