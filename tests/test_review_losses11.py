"""Loss review 11: AlignUniformLoss takes its dtype from both features, as ClipLoss and SigLIP do
(it read the image features' alone: fp64 texts beside fp32 images were cut to fp32, and integer
features passed without the other losses' one-line error). One process, well under a second."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vutrain.losses import AlignUniformLoss, ClipLoss


def test_fp32_images_beside_fp64_texts_compute_in_fp64():
    """The loss equals that of both features in fp64 to fp64 precision (an fp32 computation is
    off by ~1e-7), and so do the logged terms' dtypes."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    loss_fn = AlignUniformLoss()
    loss = loss_fn(img, txt)
    reference = AlignUniformLoss()(img.double(), txt)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    assert {v.dtype for v in loss_fn.last_terms.values()} == {torch.float64}


def test_fp64_images_beside_fp32_texts_compute_in_fp64_too():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    assert AlignUniformLoss()(img, txt).dtype == torch.float64


@pytest.mark.parametrize("bad", ["image", "text"])
def test_integer_features_get_the_losses_one_line_error(bad):
    """The same message ClipLoss gives (one shared check), for either side."""
    floats = F.normalize(torch.randn(4, 8), dim=1)
    ints = torch.ones(4, 8, dtype=torch.long)
    args = (ints, floats) if bad == "image" else (floats, ints)
    with pytest.raises(ValueError, match="need floating-point features") as from_align:
        AlignUniformLoss()(*args)
    with pytest.raises(ValueError) as from_clip:
        ClipLoss()(*args, logit_scale=torch.tensor(10.0))
    assert str(from_align.value) == str(from_clip.value)


def test_bf16_features_still_compute_in_fp32():
    """Coverage: the promoted dtype is raised to fp32 (16-bit squared distances lose the loss)."""
    img = F.normalize(torch.randn(4, 8), dim=1).bfloat16()
    assert AlignUniformLoss()(img, img.clone()).dtype == torch.float32
