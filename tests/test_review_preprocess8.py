"""The preprocessing built from a processor's dict config, in every form transformers reads."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import crop_size, make_fast_preprocess, make_preprocess

# OpenAI's own preprocessor_config.json (openai/clip-vit-base-patch32) spells the sizes as numbers;
# the rest of its fields, at a small size.
OPENAI_STYLE = {"size": 24, "crop_size": 24, "do_center_crop": True, "resample": 3}


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    photo_like(np.random.default_rng(0), width, height).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize(
    "config",
    [
        OPENAI_STYLE,
        {**OPENAI_STYLE, "size": [24, 40], "crop_size": [20, 32]},  # (height, width) pairs
    ],
    ids=["one_number", "height_width_pair"],
)
def test_a_dict_config_preprocesses_as_the_processor_made_from_it(config):
    # The dict as json.load reads a preprocessor_config.json: it was refused ("needs
    # size.shortest_edge or size.height/width; got size=24"), though transformers reads it.
    config = json.loads(json.dumps(config))
    processor = CLIPImageProcessor(**config)
    data = _jpeg(61, 47)
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    exact = make_preprocess(config)(Image.open(io.BytesIO(data)))
    fast = make_device_transform(config)(make_fast_preprocess(config)(data)[None], "cpu", torch.float32)[0]
    assert crop_size(config) == tuple(ref.shape[1:])
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    assert ((exact - ref) * std).abs().max().item() <= 0.001
    assert ((fast - ref) * std).abs().max().item() <= 8.001  # a squash: torch's bicubic, see README
