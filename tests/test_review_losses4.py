"""Inputs the losses used to score silently, and options `build_loss` used to drop.

* Image and text features whose rows do not pair up (several captions per image: [B, D] beside
  [2B, D]) or an empty batch: every loss raises one ValueError line before any collective, on
  every rank (SigLIP, and ClipLoss on rank > 0 with local_loss, used to take the wrong columns as
  positives and return a finite loss; an empty batch gave NaN, read as a numerical failure).
* `build_loss("siglip" | "align_uniform", local_loss=False or gather_with_grad=False)`: a
  ValueError, not a loss that trains with other gradients than asked.

One spawn of 2 gloo ranks; about 10 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss, build_loss

from helpers_dist import run_distributed

B, D = 3, 5
SCALE, BIAS = torch.tensor(3.0), torch.tensor(-1.0)


def features(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, D, generator=g), dim=1)


def _unpaired_losses(rank: int, world: int) -> list[str]:
    """Each loss on [B, D] images beside [2B, D] texts: the error it raised, or its value."""
    img, txt = features(B, rank), features(2 * B, 10 + rank)
    losses = [
        ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
        SigLipLoss(rank=rank, world_size=world),
        SigLipLoss(rank=rank, world_size=world, bidir=True),
        AlignUniformLoss(rank=rank, world_size=world),
    ]
    out = []
    for fn in losses:
        try:
            out.append(f"value {float(fn(img, txt, SCALE, BIAS)):.4f}")
        except ValueError as e:
            out.append(str(e))
    return out


def test_unpaired_rows_are_one_line_errors_on_every_rank():
    for rank, messages in enumerate(run_distributed(_unpaired_losses, 2)):
        for message in messages:
            assert "one shape [B, D]" in message and f"({B}, {D}) and ({2 * B}, {D})" in message, (
                rank,
                messages,
            )
            assert "\n" not in message


@pytest.mark.parametrize(
    "fn", [ClipLoss(), SigLipLoss(), AlignUniformLoss()], ids=["clip", "siglip", "align_uniform"]
)
def test_unpaired_rows_and_empty_batches_on_one_process(fn):
    with pytest.raises(ValueError, match=r"one shape \[B, D\].*\(4, 5\) and \(8, 5\)"):
        fn(features(4), features(8), SCALE, BIAS)
    with pytest.raises(ValueError, match="one shape"):
        fn(features(4), features(4)[:, :3], SCALE, BIAS)
    with pytest.raises(ValueError, match="empty batch"):
        fn(features(0), features(0), SCALE, BIAS)
    assert torch.isfinite(fn(features(4), features(4, 1), SCALE, BIAS))


@pytest.mark.parametrize("name", ["siglip", "align_uniform"])
@pytest.mark.parametrize("option", ["local_loss", "gather_with_grad"])
def test_build_loss_refuses_clip_only_options_it_cannot_honour(name, option):
    with pytest.raises(ValueError, match=f"{option}=False is a 'clip' option only"):
        build_loss(name, rank=0, world_size=1, **{option: False})
    assert build_loss(name, rank=0, world_size=1, **{option: True}) is not None
    assert build_loss("clip", rank=0, world_size=1, **{option: False}) is not None
