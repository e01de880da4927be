"""Review findings in the training data stream (vutrain/data), each one a bug seen before its fix."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream
from vutrain.data.captions import render_caption
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess, normalisation
from vutrain.data.samples import decode_image
from vutrain.data.synthetic import write_synthetic


def _transparent_png(mode: str) -> bytes:
    """A 64x48 PNG whose right half is (partly) transparent over black pixels."""
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (200, 30, 30, 255)
    rgba[:, 32:48, 3] = 128  # half transparent black
    image = Image.fromarray(rgba, "RGBA")
    buf = io.BytesIO()
    if mode == "RGBA":
        image.save(buf, "PNG")
    elif mode == "LA":
        image.convert("LA").save(buf, "PNG")
    elif mode == "P":  # a palette PNG whose black entry is transparent (tRNS)
        opaque = Image.fromarray(np.where(rgba[..., 3:] == 255, rgba[..., :3], 0).astype(np.uint8), "RGB")
        palette = opaque.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        palette.save(buf, "PNG", transparency=palette.getpixel((63, 0)))
    else:  # RGB with a tRNS transparent colour
        Image.fromarray(np.where(rgba[..., 3:] == 255, rgba[..., :3], 0).astype(np.uint8), "RGB").save(
            buf, "PNG", transparency=(0, 0, 0)
        )
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB+tRNS"])
def test_transparent_images_are_composited_on_white_like_the_processor(mode):
    """CLIPImageProcessor (transformers 5) composites transparency onto white; the fast path and
    the eval path dropped the alpha (black where transparent: 255 grey levels off)."""
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    data = _transparent_png(mode)
    expected = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    mean, std, rescale = normalisation(processor)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    expected_uint8 = (expected * std + mean) / rescale
    assert expected_uint8[:, 16, 28:].min() > 250  # the processor's white, where transparent

    fast = make_fast_preprocess(processor)(data).float()
    assert (fast - expected_uint8).abs().max() <= 1
    exact = make_preprocess(processor)(decode_image({"__key__": "k", "png": data}))
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("template", ["{category_id:03d}", "{title!x}", "{title:>{width}}"])
def test_caption_template_that_cannot_be_rendered_fails_at_start_up(tmp_path, template):
    """Known fields with a numeric format spec or a bad conversion passed the start-up check, then
    every sample was skipped as preprocess_error until the worker stopped after 10,000 of them."""
    info = write_synthetic(str(tmp_path), 8, 8, image_size=16, val_samples=0)
    with pytest.raises(ValueError, match="data.caption_template .* cannot be rendered"):
        TrainStream(
            info["train_shards"],
            preprocess=lambda image: image,
            tokenize=lambda texts: {},
            batch_size=2,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=0,
            caption_template=template,
        )
    assert render_caption("{title:.5} ({category_id})", {"title": "abcdefgh", "category_id": 3}, None) == (
        "abcde (3)"
    )
