"""Image and text features of different floating dtypes (one tower under autocast, a LoRA head or a
frozen tower kept in fp32): ClipLoss and SigLipLoss score them in the promoted dtype, as if the
caller had cast both, instead of a torch matmul traceback ("expected m1 and m2 to have the same
dtype"). Criteria, against fp64 references written from the definitions:

* 2 real gloo ranks, fp32 images beside fp64 texts, every ClipLoss mode and SigLIP gathered and
  ring (bidir): the mean of the per-rank losses is the one-process loss of the global batch, and
  each tower's gradient arrives in its own dtype with the value the mode promises (W times the
  global gradient of its slice with gather_with_grad, the exact one without; queries only for
  local_loss without gather_with_grad).
* One process, bf16 images beside fp32 texts: the loss equals the loss of the bf16 values cast to
  fp32 by hand, and the image gradient is bf16.
* Integer features: one ValueError line.

One spawn of 2 gloo ranks; about 8 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vutrain.losses import ClipLoss, SigLipLoss, build_loss

from helpers_dist import run_distributed

WORLD, B, D = 2, 3, 5
SCALE, BIAS = 3.0, -1.0

# (loss name, build_loss kwargs, takes a bias)
CASES = [
    ("clip", dict(local_loss=True, gather_with_grad=True), False),
    ("clip", dict(local_loss=False, gather_with_grad=True), True),
    ("clip", dict(local_loss=False, gather_with_grad=False), False),
    ("clip", dict(local_loss=True, gather_with_grad=False), False),
    ("siglip", dict(), True),
    ("siglip", dict(bidir=True), True),
]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 images (values exact in fp64) and fp64 texts, WORLD * B rows each."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1).float()
    txt = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def reference(name: str, img: torch.Tensor, txt: torch.Tensor, scale, bias) -> torch.Tensor:
    logits = scale * img @ txt.T + (0 if bias is None else bias)
    n = img.shape[0]
    if name == "clip":
        target = torch.arange(n)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    signs = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def _mixed_dtype_grads(rank: int, world: int, img: torch.Tensor, txt: torch.Tensor) -> list:
    rows = slice(rank * B, (rank + 1) * B)
    out = []
    for name, kw, with_bias in CASES:
        fn = build_loss(name, rank=rank, world_size=world, **kw)
        x, y = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale, bias = _scalar(SCALE), _scalar(BIAS)
        loss = fn(x, y, scale, bias if with_bias else None)
        loss.backward()
        out.append((loss.detach(), x.grad, y.grad))
    return out


@pytest.fixture(scope="module")
def world_run():
    img, txt = global_batch()
    return img, txt, run_distributed(_mixed_dtype_grads, WORLD, img, txt)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_mixed_dtypes_across_ranks_give_the_global_batch_loss(world_run, case):
    img, txt, results = world_run
    name, kw, with_bias = CASES[case]
    x, y = img.double().requires_grad_(), txt.clone().requires_grad_()
    expected = reference(name, x, y, SCALE, BIAS if with_bias else None)
    expected.backward()
    losses = torch.stack([r[case][0] for r in results])
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses.mean(), expected.detach(), rtol=1e-6, atol=1e-7)
    img_grad = torch.cat([r[case][1] for r in results])
    txt_grad = torch.cat([r[case][2] for r in results])
    assert img_grad.dtype == torch.float32 and txt_grad.dtype == torch.float64
    if kw.get("local_loss", True) and not kw.get("gather_with_grad", True):
        return  # open_clip's constant keys: only the query side learns, not the global gradient
    factor = WORLD if kw.get("gather_with_grad", True) else 1
    torch.testing.assert_close(img_grad.double(), factor * x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt_grad, factor * y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fn, bias",
    [(ClipLoss(), None), (ClipLoss(), torch.tensor(BIAS)), (SigLipLoss(), torch.tensor(BIAS))],
    ids=["clip", "clip-bias", "siglip"],
)
def test_bf16_images_beside_fp32_texts_score_as_cast_by_hand(fn, bias):
    img, txt = global_batch()
    x = img.bfloat16().requires_grad_()
    y = txt.float()
    loss = fn(x, y, torch.tensor(SCALE), bias)
    loss.backward()
    assert loss.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, fn(x.detach().float(), y, torch.tensor(SCALE), bias))


@pytest.mark.parametrize("fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_integer_features_are_a_one_line_error(fn):
    feats = torch.ones(B, D, dtype=torch.long)
    with pytest.raises(ValueError, match="floating-point features") as err:
        fn(feats, feats, torch.tensor(SCALE), torch.tensor(BIAS))
    assert "\n" not in str(err.value)
