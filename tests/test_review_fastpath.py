"""Review of the uint8 fast path on odd images: extreme aspect ratios through the real stream.

The processor resizes the shortest side to S before its centre crop, so a 1 x N image becomes
S x (S * N) pixels. The fast path resizes only the crop's window of such images (resized area
over 16x the crop's) with PIL's own arithmetic of the full resize: the processor's pixels exactly
where the decode is the processor's; after a DCT-scaled decode, the DCT path's tolerance against
``CLIPImageProcessor`` (mean <= 1.5, 99th percentile <= 12 grey levels).
"""

import io
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write_shard(path, images: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            for ext, payload in (("jpg", data), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


# A 1 x 60000 JPEG is 180 kB; its full resize at shortest edge 224 would be 224 x 13.4 million
# pixels (9 GB of uint8). The worker's address space is capped at 2 GB above what it holds.
_STREAM_UNDER_A_MEMORY_CAP = textwrap.dedent(
    """
    import resource, sys, torch
    from vutrain.data import TrainStream
    from vutrain.data.preprocess import make_fast_preprocess

    def tokenize(texts):
        ids = torch.tensor([[len(t), 1] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (held + (2 << 30), resource.RLIM_INFINITY))
    processor = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    stream = TrainStream(sys.argv[1], preprocess=make_fast_preprocess(processor), tokenize=tokenize,
                         batch_size=4, rank=0, world_size=1, num_workers=0, seed=0,
                         shuffle_buffer=1, num_samples=4)
    batch = next(stream)
    assert batch["pixel_values"].shape == (4, 3, 224, 224), batch["pixel_values"].shape
    assert stream.skipped() == {}, stream.skipped()
    print("ok", int(batch["pixel_values"].float().std() > 0))
    """
)


def test_extreme_aspect_ratio_images_stream_without_the_full_resize(tmp_path):
    rng = np.random.default_rng(0)
    tall = Image.fromarray(rng.integers(0, 255, (60000, 1, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 255, (1, 60000, 3), dtype=np.uint8))
    images = [_encode(tall, "JPEG"), _encode(photo_like(rng, 320, 240), "JPEG"), _encode(wide, "PNG")]
    images.append(_encode(photo_like(rng, 240, 320), "JPEG"))
    _write_shard(tmp_path / "00000.tar", images)
    done = subprocess.run(
        [sys.executable, "-c", _STREAM_UNDER_A_MEMORY_CAP, str(tmp_path / "00000.tar")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "ok 1" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    "size,fmt,short,crop",
    [
        ((1, 2000), "JPEG", 32, 32),
        ((2000, 1), "PNG", 32, 32),
        ((5, 400), "JPEG", 32, 32),
        ((40, 700), "JPEG", 32, 32),
        ((700, 40), "PNG", 32, 32),
        ((105, 1401), "JPEG", 32, 20),  # DCT-scaled decode (1/2) with a partial last block
        ((2000, 30), "JPEG", 16, 24),  # crop larger than the short side: zero padding
    ],
)
def test_extreme_aspect_ratio_stays_within_tolerance_of_the_processor(size, fmt, short, crop):
    processor = CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": crop, "width": crop})
    rng = np.random.default_rng(sum(size))
    w, h = size
    image = (
        photo_like(rng, w, h)
        if min(size) >= 20
        else Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
    )
    data = _encode(image, fmt)
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    pixels = make_fast_preprocess(processor)(data)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, crop, crop)
    fast = make_device_transform(processor)(pixels[None], "cpu", torch.float32)[0]
    levels = ((fast - ref) * torch.tensor(processor.image_std).view(3, 1, 1) * 255).abs()
    dct_scaled = size == (105, 1401)
    mean, p99 = levels.mean().item(), levels.quantile(0.99).item()
    assert (mean <= 1.5 and p99 <= 12) if dct_scaled else levels.max().item() < 0.01, (mean, p99)


_EVAL_PREPROCESS_UNDER_A_MEMORY_CAP = textwrap.dedent(
    """
    import resource, sys
    from PIL import Image
    from vutrain.data.preprocess import make_preprocess

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (held + (2 << 30), resource.RLIM_INFINITY))
    processor = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    pixels = make_preprocess(processor)(Image.open(sys.argv[1]))
    assert tuple(pixels.shape) == (3, 224, 224), pixels.shape
    print("ok")
    """
)


def test_eval_preprocess_of_an_extreme_aspect_ratio_fits_in_memory(tmp_path):
    """The validation stream's exact path resized the whole 1 x 60000 image first: 224 x 13
    million pixels, in fp32 some 35 GB, and the eval died at that sample (with the run)."""
    rng = np.random.default_rng(1)
    path = tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 255, (60000, 1, 3), dtype=np.uint8)).save(path)
    done = subprocess.run(
        [sys.executable, "-c", _EVAL_PREPROCESS_UNDER_A_MEMORY_CAP, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("size", [(1, 2000), (700, 40)])
def test_eval_preprocess_of_an_extreme_aspect_ratio_stays_near_the_processor(size):
    from vutrain.data.preprocess import make_preprocess

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(sum(size))
    w, h = size
    image = (
        photo_like(rng, w, h)
        if min(size) >= 20
        else Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
    )
    ref = processor(images=image, return_tensors="pt")["pixel_values"][0]
    levels = (
        (make_preprocess(processor)(image) - ref) * torch.tensor(processor.image_std).view(3, 1, 1) * 255
    ).abs()
    assert levels.max().item() < 0.01, levels.max().item()  # the window is PIL's full resize
