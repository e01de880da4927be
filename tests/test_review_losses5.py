"""Multi-hot (BoolTensor [B, L]) labels whose width L differs between ranks and micro-batches.

A caller that builds multi-hot rows over the labels seen so far (or per batch) hands each rank a
different L. The all-gather of the labels needs one shape on every rank: gloo aborted the whole
process (`gloo::EnforceNotMet ... Received data size doesn't match expected size`, SIGABRT), and
GradCache's concatenation of micro-batches raised a torch.cat size error. The columns past a
rank's width are labels none of its samples has, so padding with False keeps every positive.

Criterion: on 2 and 3 real gloo ranks, the gathered labels' positive mask equals the positive
mask of the global batch built from the label sets (no `positive_mask`); ClipLoss (local and
global), SigLipLoss (gathered and ring) give the fp64 one-process loss over the global batch and
its gradients (mean over ranks; rank r's feature gradient / W is its slice's). Two spawns, about
10 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_dist import run_distributed

B, D = 4, 5
SCALE, BIAS = 3.0, -1.0
TOL = dict(rtol=1e-9, atol=1e-12)

# Label sets by rank (ids index the multi-hot columns): an unlabelled row, a label shared across
# ranks, a label only the wider rank has, rows with two labels.
SETS = [
    [{0}, set(), {1}, {2}],
    [{3}, {0}, set(), {1, 3}],
    [set(), {1}, {0, 1}, set()],
]
WIDTHS = [3, 4, 2]


def multi_hot(sets: list[set[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(sets), width, dtype=torch.bool)
    for i, ids in enumerate(sets):
        for k in ids:
            out[i, k] = True
    return out


def rank_labels(rank: int) -> torch.Tensor:
    return multi_hot(SETS[rank], WIDTHS[rank])


def positives(world: int) -> torch.Tensor:
    """[N, N]: i ~ j when their sets share an id, and always i ~ i."""
    sets = [s for r in range(world) for s in SETS[r]]
    n = len(sets)
    return torch.tensor([[i == j or bool(sets[i] & sets[j]) for j in range(n)] for i in range(n)])


def batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    img = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def clip_ref(img, txt, scale, bias, pos):
    logits = scale * img @ txt.T + bias
    target = pos.double() / pos.double().sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def siglip_ref(img, txt, scale, bias, pos):
    z = pos.double() * 2 - 1
    return -F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / img.shape[0]


CASES = [
    ("clip", dict(local_loss=True), clip_ref),
    ("clip", dict(local_loss=False), clip_ref),
    ("siglip", dict(), siglip_ref),
    ("siglip", dict(bidir=True), siglip_ref),
]


def _on_rank(rank, world, img, txt):
    from vutrain.losses import build_loss
    from vutrain.losses.positives import gather_labels, positive_mask

    labels = rank_labels(rank)
    gathered = gather_labels(labels, world)
    out = {"mask": positive_mask(gathered, gathered), "losses": []}
    rows = slice(rank * B, (rank + 1) * B)
    for name, kw, _ in CASES:
        fn = build_loss(name, rank=rank, world_size=world, **kw)
        x, y = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        loss = fn(x, y, scale, bias, labels=labels)
        loss.backward()
        out["losses"].append([loss.detach(), x.grad, y.grad, scale.grad, bias.grad])
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_run(request):
    world = request.param
    img, txt = batch(world)
    return world, img, txt, run_distributed(_on_rank, world, img, txt)


def test_multi_hot_of_different_widths_gathers_to_the_global_positive_mask(world_run):
    """Widths 3 and 4 (and 2) on different ranks: no abort, and every rank's mask of the gathered
    labels is the global batch's positive mask."""
    world, _, _, res = world_run
    for r in res:
        assert torch.equal(r["mask"], positives(world))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_multi_hot_of_different_widths_gives_the_global_batch_loss(world_run, case):
    """mean_r loss_r == L, grad_r / W == dL/d(slice r), mean_r d loss_r/d(scale, bias) == dL/d(...)."""
    world, img, txt, res = world_run
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    want = CASES[case][2](x, y, scale, bias, positives(world))
    want.backward()
    per_rank = [r["losses"][case] for r in res]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / world, want.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / world, x.grad, **TOL)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / world, y.grad, **TOL)
    torch.testing.assert_close(sum(r[3] for r in per_rank) / world, scale.grad, **TOL)
    torch.testing.assert_close(sum(r[4] for r in per_rank) / world, bias.grad, **TOL)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_micro_batches_of_different_multi_hot_widths_concatenate_to_the_whole_batch(name):
    """GradCache concatenates the micro-batches' labels: widths 3, 4, 2 give the loss of the
    whole batch at world 1 (a torch.cat size error before)."""
    from vutrain.losses import build_loss
    from vutrain.losses.positives import concat_labels

    img, txt = batch(3)
    labels = concat_labels([rank_labels(r) for r in range(3)])
    scale = torch.tensor(SCALE, dtype=torch.float64)
    bias = torch.tensor(BIAS, dtype=torch.float64)
    got = build_loss(name, rank=0, world_size=1)(img, txt, scale, bias, labels=labels)
    ref = clip_ref if name == "clip" else siglip_ref
    torch.testing.assert_close(got, ref(img, txt, scale, bias, positives(3)), **TOL)
