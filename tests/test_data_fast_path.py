"""The training workers' uint8 fast path against the CLIPImageProcessor-exact float path.

Tolerances, in grey levels (0..255) after undoing the normalisation:
- no DCT-scaled decode (image under 3.2x the target): at most 1 level anywhere. Both sides use
  PIL's antialiased bicubic filter on uint8 with rounding between the two passes; torch's
  kernel and PIL's fixed-point arithmetic differ by at most one rounding step.
- DCT-scaled decode (image at least 3.2x the target): mean <= 1.5, 99th percentile <= 12. The
  decoder's 1/2-1/8 scaling is a box-like filter in the DCT domain, not PIL's bicubic; measured
  on these thumbnail-like JPEGs: mean 0.4-1.0, p99 3-9, single pixels on hard edges up to ~45.
"""

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_stream import BAD_REASONS, _write_bad_shards
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data import TrainStream
from vutrain.data import samples as samples_mod
from vutrain.data.device_transform import crop_and_resize, make_device_transform, random_resized_crop_boxes
from vutrain.data.epoch_plan import auto_num_workers
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
from vutrain.data.samples import SkipSample, decode_image_array, iter_raw_samples, jpeg_size
from vutrain.data.synthetic import write_synthetic


def _jpeg(w, h, seed=0, quality=85) -> bytes:
    buf = io.BytesIO()
    photo_like(np.random.default_rng(seed), w, h).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _levels(processor, data: bytes) -> torch.Tensor:
    """|fast - processor| per value, in grey levels."""
    ref = make_preprocess(processor)(Image.open(io.BytesIO(data)).convert("RGB"))
    pixels = make_fast_preprocess(processor)(data)
    assert pixels.dtype == torch.uint8 and pixels.shape == ref.shape
    out = make_device_transform(processor)(pixels[None], "cpu", torch.float32)[0]
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    return ((out - ref) * std).abs()


@pytest.mark.parametrize(
    "size,short,crop",
    [
        ((45, 34), 24, 24),
        ((34, 60), 24, 24),
        ((24, 24), 24, 24),
        ((20, 90), 24, 24),
        ((90, 60), 32, 32),
        ((40, 30), 20, 24),
    ],
)
def test_fast_path_equals_processor_without_dct_scaling(size, short, crop):
    processor = CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": crop, "width": crop})
    for seed in range(3):
        assert _levels(processor, _jpeg(*size, seed)).max().item() <= 1.001


@pytest.mark.parametrize(
    "size,short", [((200, 150), 32), ((150, 200), 32), ((341, 256), 64), ((480, 360), 64)]
)
def test_fast_path_with_dct_scaling_within_tolerance(size, short):
    processor = CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": short, "width": short})
    diff = torch.cat([_levels(processor, _jpeg(*size, seed)).flatten() for seed in range(4)])
    assert diff.mean().item() <= 1.5 and diff.quantile(0.99).item() <= 12


def test_png_and_grayscale_and_cmyk_take_the_same_geometry():
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    image = photo_like(np.random.default_rng(1), 40, 30)
    for mode, fmt in [("RGB", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG")]:
        buf = io.BytesIO()
        image.convert(mode).save(buf, fmt)
        assert _levels(processor, buf.getvalue()).max().item() <= 2.001, (mode, fmt)


@pytest.mark.parametrize("size", [(200, 150), (1280, 720), (1281, 721), (96, 64)])
def test_simplejpeg_and_pil_decoders_agree(monkeypatch, size):
    """Same pixels from both decoders, DCT-scaled or not (1/2, 1/4, 1/8 by PIL's draft rule)."""
    data = _jpeg(*size, 3)
    assert jpeg_size(data) == size and jpeg_size(b"\x89PNG....") is None
    assert samples_mod._simplejpeg() is not None  # a core requirement: the fast decoder is there
    targets = [None, (60, 45), (size[0] // 5, size[1] // 5), (size[0] // 9, size[1] // 9)]
    fast = [decode_image_array(data, t) for t in targets]
    monkeypatch.setattr(samples_mod, "_simplejpeg", lambda: None)
    with_pil = [decode_image_array(data, t) for t in targets]
    if size == (200, 150):
        assert with_pil[1].shape == (75, 100, 3)  # DCT-scaled by 2: 200 // 60 = 3 -> 2
    for a, b in zip(fast, with_pil):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_truncated_jpeg_is_undecodable():
    data = _jpeg(64, 48)
    with pytest.raises(SkipSample, match="undecodable_image"):
        make_fast_preprocess({"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}})(
            data[: len(data) // 2]
        )


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2 (decoded in full), 4:2:0
def test_decompression_bomb_jpeg_is_undecodable_as_with_pil(monkeypatch, subsampling):
    """Over PIL's limit (2 x Image.MAX_IMAGE_PIXELS) the fast path refuses a JPEG as eval's PIL path
    does, instead of decoding it with simplejpeg (gigabytes in a worker for a huge 4:2:2 one)."""
    buf = io.BytesIO()
    photo_like(np.random.default_rng(0), 64, 48).save(buf, "JPEG", subsampling=subsampling)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 > 2 x 1000
    with pytest.raises(SkipSample, match="undecodable_image.*decompression bomb"):
        samples_mod.decode_image({"__key__": "k", "jpg": buf.getvalue()})
    with pytest.raises(SkipSample, match="undecodable_image.*decompression bomb"):
        make_fast_preprocess({"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}})(
            buf.getvalue()
        )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    info = write_synthetic(str(root / "syn"), 96, 16, image_size=40, seed=3, val_samples=0)
    (root / "bad").mkdir()
    _write_bad_shards(root / "bad", root / "syn" / "train" / "00000.tar")
    return {"train": info["train_shards"], "bad": root / "bad"}


def _tokenize(texts):
    ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _stream(spec, **kw):
    args = dict(
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=5,
        shuffle_buffer=16,
        num_samples=96,
        preprocess=make_fast_preprocess(
            {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
        ),
        tokenize=_tokenize,
    )
    args.update(kw)
    return TrainStream(spec, **args)


def test_fast_stream_resumes_exactly_and_counts_bad_samples(shards):
    spec = f"{shards['train']}::{shards['bad']}/bad.tar::{shards['bad']}/cut.tar"
    with _stream(spec, num_workers=2) as straight:
        expected = [next(straight) for _ in range(10)]
        skipped = straight.skipped()
    batch = expected[0]
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["pixel_values"].is_contiguous()
    with _stream(spec, num_workers=2) as first:
        [next(first) for _ in range(5)]
        state = json.loads(json.dumps(first.state_dict()))
    with _stream(spec, num_workers=2) as resumed:
        resumed.load_state_dict(state)
        for want in expected[5:]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert resumed.skipped() == skipped
    assert set(skipped) <= set(BAD_REASONS) and "undecodable_image" in skipped and "tar_error" in skipped


def test_auto_workers_resume_adopts_the_saved_count(shards):
    with _stream(shards["train"], num_workers=2) as two:
        next(two)
        state = two.state_dict()
    auto = _stream(shards["train"], num_workers=-1)
    auto.load_state_dict(state)  # whatever auto chose here, the saved 2 workers win
    assert auto.plan.workers == 2 and auto.num_workers == 2
    auto.close()
    assert auto_num_workers(8, 1, 1, False, cores=16, machine_cores=16) == 8  # capped by shards
    assert auto_num_workers(100, 1, 8, True, cores=64, machine_cores=64) == 7  # 8 cores per rank, less one
    assert auto_num_workers(100, 1, 8, True, cores=4, machine_cores=64) == 3  # a SLURM task's own share
    assert auto_num_workers(100, 1, 1, True, cores=1, machine_cores=1) == 1


def test_device_transform_normalises_and_augments_deterministically():
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    plain = make_device_transform(processor)(pixels, "cpu", torch.bfloat16)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    assert plain.dtype == torch.bfloat16
    assert torch.allclose(plain.float(), (pixels / 255 - mean) / std, atol=0.03)
    floats = torch.randn(2, 3, 16, 16)  # a float batch is already normalised: moved and cast only
    assert torch.equal(make_device_transform(processor)(floats, "cpu", torch.float32), floats)

    position = [0]
    aug = make_device_transform(processor, random_resized_crop=True, seed=1, position=lambda: position[0])
    a, b = aug(pixels, "cpu", torch.float32), aug(pixels, "cpu", torch.float32)
    position[0] = 1
    c = aug(pixels, "cpu", torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain.float())
    boxes = random_resized_crop_boxes(1000, 16, 16, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 16).all()
    assert ((h * w / 256) >= 0.85).all()  # scale 0.9-1.0 of the area (rounded to whole pixels)
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)
    assert torch.allclose(crop_and_resize(pixels.float(), whole), pixels.float(), atol=1e-3)


class _BlockingHostToDevice(TorchDispatchMode):
    """Records host-to-device copies that are not non_blocking: on a GPU each one waits for the
    device's whole queue (torch's blocking H2D copy synchronises the stream)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
            if src.type == "cpu" and dst.type != "cpu" and not kwargs.get("non_blocking", False):
                self.found.append(tuple(args[0].shape))
        return func(*args, **kwargs)


@pytest.mark.parametrize("crop", [False, True])
def test_device_transform_copies_to_the_device_without_blocking(crop):
    """The meta device stands in for a GPU. Per micro-batch, every host tensor (the pixels, the
    random crop's boxes) goes over non_blocking; the crop's boxes went over blocking, a stall per
    micro-batch on a GPU with data.random_resized_crop=true."""
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    transform = make_device_transform(processor, random_resized_crop=crop)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    transform(pixels, "meta", torch.bfloat16)  # the first call moves the mean and std once
    with _BlockingHostToDevice() as copies:
        out = transform(pixels, "meta", torch.bfloat16)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == pixels.shape
    assert copies.found == []


def test_stream_without_loader_workers_pins_its_batches(shards, monkeypatch):
    """pin_memory=True (the trainer's choice for a CUDA run) pins every tensor of a batch. Without
    loader workers there is no DataLoader and so no pin thread: those batches stayed pageable, and
    the trainer's non_blocking copies of them were not asynchronous. Pinning is recorded here (a
    CPU-only torch cannot pin); with workers the DataLoader's own pin thread does it."""
    pinned = []

    def fake_pin(self, *args, **kwargs):
        pinned.append(self.data_ptr())
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with _stream(shards["train"], num_workers=0, pin_memory=True, positives="category") as stream:
        batch = next(stream)
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    assert {"pixel_values", "input_ids", "attention_mask", "labels"} <= set(batch)
    assert sorted(pinned) == sorted(t.data_ptr() for t in tensors)
    pinned.clear()
    with _stream(shards["train"], num_workers=0, pin_memory=False) as stream:
        next(stream)
    assert pinned == []


def test_tar_reader_matches_tarfile(tmp_path):
    def members(path, fmt):
        with tarfile.open(path, "w", format=fmt) as tar:
            names = [("a/0.jpg", 0), ("x" * 120 + "/0.txt", 700), ("1.json", 512), ("d/" + "y" * 90, 9)]
            for name, size in names:
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, io.BytesIO(os.urandom(size)))
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)

    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        members(path, fmt)
        with tarfile.open(path) as tar:
            want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        gz = tmp_path / f"{fmt}.tar.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        for p in (path, gz):
            with open(p, "rb") as fh:
                assert list(samples_mod._iter_files(fh)) == want
    bad = bytearray((tmp_path / f"{tarfile.USTAR_FORMAT}.tar").read_bytes())
    bad[3072 + 100] ^= 0xFF  # the 4th member's header: counted, not silent; the pending sample is dropped
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    counted = []
    keys = [s["__key__"] for s in iter_raw_samples(str(tmp_path / "bad.tar"), counted.append)]
    assert keys == ["a/0", "x" * 120 + "/0"] and counted == ["tar_error"]


def _shard_of_three_samples(path):
    """c0, c1, c2: a jpg, a json and a txt each (payloads of 700, 300, 20 bytes)."""
    with tarfile.open(path, "w") as tar:
        for key in ("c0", "c1", "c2"):
            for ext, size in (("jpg", 700), ("json", 300), ("txt", 20)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(os.urandom(size)))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar}


def test_damaged_shard_keys_agree_between_the_stream_and_the_resume_replay(tmp_path):
    """A resume on another world size replays the workers' draws from the shards' keys. Those came
    from tarfile's stream mode, which disagreed with the workers' reader on damaged shards (one key
    more: the replay then marked an undrawn sample as drawn and let a drawn one be drawn again).
    Both now come from the same reader; the keys must agree at every cut and after a bad header."""
    from vutrain.data.epoch_remainder import _read_keys

    full = tmp_path / "full.tar"
    members = _shard_of_three_samples(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    for end in range(0, len(data), 97):
        cut.write_bytes(data[:end])
        read = [s["__key__"] for s in iter_raw_samples(str(cut))]
        assert _read_keys(str(cut)) == read, end
    bad = bytearray(data)
    bad[members["c1.json"].offset + 100] ^= 0xFF  # c1.json's header
    cut.write_bytes(bytes(bad))
    assert _read_keys(str(cut)) == [s["__key__"] for s in iter_raw_samples(str(cut))] == ["c0"]
    # Cut inside c1.jpg, the first member of c1: c0 is complete and kept (it was dropped).
    cut.write_bytes(data[: members["c1.jpg"].offset_data + 10])
    counted = []
    assert [s["__key__"] for s in iter_raw_samples(str(cut), counted.append)] == ["c0"]
    assert counted == ["tar_error"] and _read_keys(str(cut)) == ["c0"]
    # Cut inside c1.json: c1 is incomplete and dropped.
    cut.write_bytes(data[: members["c1.json"].offset_data + 10])
    assert [s["__key__"] for s in iter_raw_samples(str(cut))] == ["c0"] == _read_keys(str(cut))


def test_resume_replay_reads_the_headers_only(tmp_path, monkeypatch):
    """The replay read every payload byte of every shard (tarfile's stream mode), twice per rank on
    a world-size change: the whole data set. Now a local shard's payloads are seeked over."""
    from vutrain.data.epoch_remainder import _read_keys

    path = tmp_path / "s.tar"
    _shard_of_three_samples(path)
    read = []
    real_open = samples_mod._open

    class Counted(io.BufferedReader):
        def read(self, n=-1):
            out = super().read(n)
            read.append(len(out))
            return out

    import vutrain.data.epoch_remainder as remainder_mod

    counted_open = lambda url: Counted(io.FileIO(url))  # noqa: E731
    monkeypatch.setattr(samples_mod, "_open", counted_open)
    monkeypatch.setattr(remainder_mod, "_open", counted_open, raising=False)  # where it was read
    assert _read_keys(str(path)) == ["c0", "c1", "c2"]
    monkeypatch.setattr(samples_mod, "_open", real_open)
    assert sum(read) <= 16 * 512 < path.stat().st_size // 2  # 9 headers and the end block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_uint8_batches_normalise_on_the_gpu_as_on_the_cpu(shards):
    with _stream(shards["train"], num_workers=1) as stream:
        assert stream.pin_memory
        pixels = next(stream)["pixel_values"]
    assert pixels.is_pinned() and pixels.dtype == torch.uint8
    processor = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    on_gpu = make_device_transform(processor)(pixels, "cuda", torch.bfloat16)
    on_cpu = make_device_transform(processor)(pixels, "cpu", torch.bfloat16)
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu().float(), on_cpu.float(), atol=0.02)
