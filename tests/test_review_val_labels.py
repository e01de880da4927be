"""The zero-shot class list reads the shards' ``.json`` members only, and finds what a full read finds.

``collect_label_values`` runs at every start (rank 0) over the whole held-out set; it read every
member's bytes, JPEGs included (about 40x the metadata). It now asks the raw reader for the
``json`` payloads alone, which seeks over the rest of a local plain tar. Real shards (the synthetic
generator and hand-written tars), real files; the bytes read are audited at the file object.
"""

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile

import pytest

from vutrain.data.samples import SkipCounter, SkipSample, decode_meta, iter_raw_samples
from vutrain.data.shards import expand_shards
from vutrain.data.synthetic import write_synthetic
from vutrain.data.val import collect_label_values, label_values


def _full_read_classes(spec: str, field: str) -> tuple[list[str], dict]:
    """The class list as it was computed before: every member read."""
    values, skipped = set(), SkipCounter()
    for url in expand_shards(spec):
        for raw in iter_raw_samples(url, skipped):
            try:
                values.update(label_values(decode_meta(raw).get(field), field))
            except SkipSample as e:
                skipped(e.reason)
    return sorted(values), dict(skipped)


def _payload_bytes(path, keep) -> int:
    """Padded data bytes of the members whose extension ``keep`` accepts."""
    with tarfile.open(path) as tar:
        return sum(-(-m.size // 512) * 512 for m in tar if m.isfile() and keep(m.name.split(".", 1)[1]))


def test_class_list_reads_only_the_json_members_and_matches_a_full_read(tmp_path, counted_reads):
    """Same classes, same order as the full read, for a scalar field, a list field and an id field;
    the bytes read stay below the shard sizes minus every non-json member's data (images unread)."""
    info = write_synthetic(str(tmp_path / "syn"), 8, 8, image_size=96, seed=3, val_samples=30)
    spec = info["val_shards"]
    urls = expand_shards(spec)
    assert len(urls) >= 2
    for field in ("category_name", "tags", "category_id"):
        want, _ = _full_read_classes(spec, field)
        counted_reads.clear()
        assert collect_label_values(spec, field) == want and want, field
        budget = sum(os.path.getsize(u) - _payload_bytes(u, lambda ext: ext != "json") for u in urls)
        assert sum(counted_reads) <= budget, field
        assert sum(counted_reads) < sum(os.path.getsize(u) for u in urls) // 2, field


def _shard(path) -> dict:
    """s0..s2: a jpg, a json (category_name s<i>) and a txt each; the members by name."""
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            meta = json.dumps({"category_name": f"class {i}", "tags": ["t", f"u{i}"]}).encode()
            for ext, data in (("jpg", os.urandom(900 + 300 * i)), ("json", meta), ("txt", b"title")):
                member = tarfile.TarInfo(f"s{i}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar}


def _read(url: str, payloads) -> tuple[list[tuple], list[str]]:
    counted: list[str] = []
    samples = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in iter_raw_samples(url, counted.append, payloads)
    ]
    return samples, counted


def _assert_json_only_read_agrees(url: str, where) -> None:
    full, full_counted = _read(url, True)
    some, some_counted = _read(url, {"json"})
    assert [k for k, _ in some] == [k for k, _ in full] and some_counted == full_counted, where
    for (_, got), (_, want) in zip(some, full):
        assert got.keys() == want.keys(), where
        assert got.get("json") == want.get("json"), where
        assert all(got[ext] is None for ext in got if ext != "json"), where


def test_json_only_read_keeps_the_samples_and_damage_of_a_full_read(tmp_path):
    """``payloads={"json"}``: the other members come back as None; the keys, the json bytes and the
    tar_error count equal a full read's, for a plain tar and a .tar.gz cut at every 97th byte
    and for a bad header, so a damaged held-out shard gives the same classes and counts."""
    whole = tmp_path / "whole.tar"
    members = _shard(whole)
    data = whole.read_bytes()
    plain, packed = tmp_path / "cut.tar", tmp_path / "cut.tar.gz"
    for end in [*range(0, len(data), 97), len(data)]:
        plain.write_bytes(data[:end])
        packed.write_bytes(gzip.compress(data[:end]))
        _assert_json_only_read_agrees(str(plain), ("plain", end))
        _assert_json_only_read_agrees(str(packed), ("gz", end))
    for name in ("s1.jpg", "s1.json", "s2.txt"):
        bad = bytearray(data)
        bad[members[name].offset + 100] ^= 0xFF
        plain.write_bytes(bytes(bad))
        _assert_json_only_read_agrees(str(plain), ("bad header", name))
    # A lone extension string is that extension, not its letters.
    (sample, *_), _ = _read(str(whole), "JSON")
    assert sample[1]["json"] is not None and sample[1]["jpg"] is None


def test_class_list_of_a_damaged_shard_counts_what_a_full_read_counts(tmp_path, caplog):
    """A held-out shard cut inside an image: the classes before the cut and one tar_error, as before."""
    whole = tmp_path / "whole.tar"
    members = _shard(whole)
    cut = tmp_path / "val" / "0.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: members["s2.jpg"].offset_data + 50])
    assert collect_label_values(str(cut)) == _full_read_classes(str(cut), "category_name")[0]
    assert collect_label_values(str(cut)) == ["class 0", "class 1"]
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "ext,compress", [("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)]
)
def test_compressed_shard_damaged_in_a_header_loses_what_a_plain_tar_loses(tmp_path, ext, compress):
    """tarfile's stream mode ended a compressed shard silently at a cut-short or bad header after
    the first: no tar_error, and the sample in progress kept though members were missing. Now the
    samples and counts of a compressed shard equal the plain tar's at every cut and bad header."""
    whole = tmp_path / "whole.tar"
    members = _shard(whole)
    data = whole.read_bytes()
    plain, packed = tmp_path / "cut.tar", tmp_path / f"cut.tar.{ext}"

    def assert_same(blob: bytes, where) -> None:
        plain.write_bytes(blob)
        packed.write_bytes(compress(blob))
        assert _read(str(packed), True) == _read(str(plain), True), where

    for end in range(512, len(data), 97):
        assert_same(data[:end], end)
    header = members["s1.txt"].offset
    assert_same(data[: header + 100], "cut in s1.txt's header")
    assert _read(str(packed), {"json"})[1] == ["tar_error"]
    for name in ("s1.jpg", "s1.json", "s2.txt"):
        bad = bytearray(data)
        bad[members[name].offset + 100] ^= 0xFF
        assert_same(bytes(bad), ("bad header", name))
