"""A preset's model.image_size that is not a whole number of its patches is a config error.

The patch convolution (stride = patch) and HF's patch grid (image_size // patch_size) both round
down, so at model.image_size=60 with the tiny preset's 8-pixel patches the last 4 pixel rows and
columns of every image never reached the model, and the run trained without a word.
"""

from __future__ import annotations

import pytest
import torch

from vutrain.config import ConfigError, ModelConfig
from vutrain.gradcache_bench import _Tokenizer
from vutrain.model import build_model, check_model_config


def test_a_preset_built_at_a_side_between_patches_never_sees_its_last_pixels():
    """Why it is refused: at 60 pixels the tiny preset's image features ignore the last 4 rows and
    columns entirely (the same features whatever they hold)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", image_size=60), _Tokenizer()).eval()
    pixels = torch.randn(2, 3, 60, 60, generator=torch.Generator().manual_seed(1))
    edited = pixels.clone()
    edited[:, :, 56:, :] = 5.0
    edited[:, :, :, 56:] = -5.0
    with torch.no_grad():
        assert torch.equal(model(pixels)[0], model(edited)[0])


@pytest.mark.parametrize(
    "preset, side, remedy",
    [("tiny", 60, "last 4 pixel rows and columns .* use 56 or 64"), ("vit-b-16", 300, "use 288 or 304")],
)
def test_an_image_size_between_two_patch_multiples_is_a_config_error(preset, side, remedy):
    message = rf"model.image_size={side} is not a multiple of the {preset} .*{remedy}"
    with pytest.raises(ConfigError, match=message):
        check_model_config(ModelConfig(preset=preset, image_size=side))


def test_image_sizes_of_whole_patches_still_pass():
    """The presets' own sizes and other multiples of the patch; below one patch keeps its message."""
    for preset, side in [("tiny", 0), ("tiny", 56), ("tiny", 96), ("vit-b-16", 384), ("vit-l-14", 336)]:
        check_model_config(ModelConfig(preset=preset, image_size=side))
    with pytest.raises(ConfigError, match=r"model.image_size=4 is smaller than the tiny preset's 8-pixel"):
        check_model_config(ModelConfig(preset="tiny", image_size=4))
