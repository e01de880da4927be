"""A truncated compressed shard (.tar.gz / .bz2 / .xz, read through tarfile) loses what a truncated
plain tar loses, and the header-only read of the world-size reshape finds the keys the workers drew."""

import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from vutrain.data.samples import iter_raw_samples


def _tar_of_three_samples() -> tuple[bytes, int]:
    """Three samples (jpg + txt); the offset inside s2's image data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("s0", "s1", "s2"):
            for ext, size in (("jpg", 3000), ("txt", 5)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
    raw = buf.getvalue()
    cut = tarfile.open(fileobj=io.BytesIO(raw)).getmember("s2.jpg").offset_data + 100
    return raw, cut


@pytest.mark.parametrize(
    "ext,compress", [("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)]
)
def test_truncated_compressed_shard_keeps_the_complete_samples(tmp_path, ext, compress):
    raw, cut = _tar_of_three_samples()
    plain, packed = tmp_path / "cut.tar", tmp_path / f"cut.tar.{ext}"
    plain.write_bytes(raw[:cut])
    packed.write_bytes(compress(raw[:cut]))
    counts = []
    keys = [s["__key__"] for s in iter_raw_samples(str(packed), counts.append)]
    assert keys == [s["__key__"] for s in iter_raw_samples(str(plain))] == ["s0", "s1"]
    assert counts == ["tar_error"]
    assert [s["__key__"] for s in iter_raw_samples(str(packed), payloads=False)] == keys
