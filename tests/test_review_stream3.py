"""Training stream on real tar shards: metadata written with a byte-order mark, and the epoch size
of compressed shards from img2dataset's stats files."""

import gzip
import io
import json
import tarfile

import numpy as np
import torch
from PIL import Image

from vutrain.data import TrainStream
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.shards import count_samples

BOM = b"\xef\xbb\xbf"
SIZE = 8
PROCESSOR = {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}}


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, payload in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


class _Captions:
    """A tokenizer that keeps the captions it was given (the stream's output text)."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, captions: list[str]) -> dict:
        self.seen.extend(captions)
        n = len(captions)
        return {"input_ids": torch.zeros(n, 4, dtype=torch.long), "attention_mask": torch.ones(n, 4)}


def _stream(spec: str, tokenize, batch_size: int, template: str, num_samples=None) -> TrainStream:
    return TrainStream(
        spec,
        preprocess=make_fast_preprocess(PROCESSOR),
        tokenize=tokenize,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        caption_template=template,
        shuffle_buffer=0,
        num_samples=num_samples,
    )


def test_metadata_and_captions_with_a_byte_order_mark_are_read(tmp_path):
    """Each of 4 samples has a .json and a .txt that begin with a UTF-8 BOM (as Windows tools write
    them): the stream yields all 4, no sample skipped (before: every one was bad_json), with the
    title and the .txt caption exactly as written, no U+FEFF in front."""
    titles = [f"title {i} café" for i in range(4)]
    samples = {
        f"{i:05d}": {
            "jpg": _jpeg(i),
            "json": BOM + json.dumps({"title": titles[i], "tags": ["a"]}).encode("utf-8"),
            "txt": BOM + f"caption {i}".encode(),
        }
        for i in range(4)
    }
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(samples))
    spec = str(tmp_path / "00000.tar")
    for template, expected in (("{title}", titles), ("{txt}", [f"caption {i}" for i in range(4)])):
        tokenize = _Captions()
        with _stream(spec, tokenize, 4, template, num_samples=4) as stream:
            batch = next(stream)
            assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE)
            assert stream.skipped() == {}
        assert sorted(tokenize.seen) == sorted(expected)


def test_compressed_shards_take_the_epoch_size_from_img2dataset_stats(tmp_path):
    """Gzipped img2dataset shards (00000.tar.gz beside 00000_stats.json): the samples per epoch are
    the stats' successes summed (5 + 3), as for plain tars; before, no stats file was found and the
    stream refused to start without data.num_samples."""
    sizes = {"00000": 5, "00001": 3}
    for name, count in sizes.items():
        samples = {
            f"{name}{i:04d}": {"jpg": _jpeg(i), "json": json.dumps({"title": f"t{i}"}).encode()}
            for i in range(count)
        }
        (tmp_path / f"{name}.tar.gz").write_bytes(gzip.compress(_tar_bytes(samples)))
        (tmp_path / f"{name}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    shards = [str(tmp_path / f"{name}.tar.gz") for name in sizes]
    assert count_samples(shards) == 8
    with _stream(str(tmp_path / "{00000..00001}.tar.gz"), _Captions(), 2, "{title}") as stream:
        assert stream.num_samples == 8 and stream.steps_per_epoch == 4
        assert next(stream)["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_an_upsampled_spec_counts_its_repeated_shards_once_per_mention(tmp_path):
    """A folder of 3 shards with __len__ (3 x 4 samples) and per-shard stats, named by a spec that
    repeats two of them (`{0..2}.tar::{0..1}.tar`, upsampling): the epoch is the 5 mentions' 20
    samples, as sizes.json or the stats give for such a list (before: __len__'s 12, an epoch that
    ended before the repeats were read); the plain spec keeps __len__'s count."""
    for shard in range(3):
        samples = {f"{shard}{i:03d}": {"jpg": _jpeg(i), "txt": b"t"} for i in range(4)}
        (tmp_path / f"{shard:05d}.tar").write_bytes(_tar_bytes(samples))
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": 4}))
    (tmp_path / "__len__").write_text("12\n")
    every = [str(tmp_path / f"{s:05d}.tar") for s in range(3)]
    assert count_samples(every) == 12
    assert count_samples(every + every[:2]) == 20
    spec = f"{tmp_path}/{{00000..00002}}.tar::{tmp_path}/{{00000..00001}}.tar"
    with _stream(spec, _Captions(), 4, "{txt}") as stream:
        assert stream.num_samples == 20 and stream.steps_per_epoch == 5
