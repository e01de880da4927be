"""Review tests: the synthetic writer into a used folder; empty and boundary-cut tars (real files)."""

import gzip
import io
import os
import shutil
import subprocess
import tarfile

import pytest
import webdataset as wds

from vutrain.data.samples import iter_raw_samples
from vutrain.data.synthetic import main, write_synthetic


def _read(url, payloads=True):
    counted = []
    keys = [s["__key__"] for s in iter_raw_samples(str(url), counted.append, payloads)]
    return keys, counted


def test_rerun_into_the_same_out_replaces_an_earlier_bigger_run(tmp_path):
    """8 train shards then 2 (and no val): 00002..00007.tar and the old val/ stayed beside the new
    data, so a directory read mixed 16 old samples into the 4 new ones."""
    write_synthetic(str(tmp_path), 16, 2, image_size=8, seed=1, val_samples=4)
    info = write_synthetic(str(tmp_path), 4, 2, image_size=8, seed=2, val_samples=0)
    train = tmp_path / "train"
    tars = sorted(train.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar"]
    assert not any(p.name.startswith(("00002", "00007")) for p in train.iterdir())
    assert info["val_shards"] is None and not (tmp_path / "val").exists()
    assert sum(len(_read(t)[0]) for t in tars) == 4


def test_a_folder_the_writer_did_not_write_is_refused_untouched(tmp_path, capsys):
    """An img2dataset folder under OUT/train has the same shard names: they were overwritten one by
    one (and the rest mixed in). Refused in one line, exit code 1, nothing changed."""
    train = tmp_path / "train"
    train.mkdir()
    (train / "00000.tar").write_bytes(b"real data")
    (train / "00005.tar").write_bytes(b"more real data")
    with pytest.raises(FileExistsError, match="pass an empty or new output folder"):
        write_synthetic(str(tmp_path), 4, 2, image_size=8, val_samples=0)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--num-samples", "4", "--shard-size", "2", "--image-size", "8"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the shards under --out {tmp_path}") and err.count("\n") == 1
    assert sorted(p.name for p in train.iterdir()) == ["00000.tar", "00005.tar"]
    assert (train / "00000.tar").read_bytes() == b"real data" and not (tmp_path / "val").exists()


def test_a_foreign_file_beside_earlier_synthetic_shards_is_kept_and_refused(tmp_path):
    write_synthetic(str(tmp_path), 4, 2, image_size=8, val_samples=2)
    (tmp_path / "val" / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_synthetic(str(tmp_path), 4, 2, image_size=8, val_samples=0)
    assert (tmp_path / "val" / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "train" / "00001.tar").exists()


@pytest.mark.parametrize(
    "name,content",
    # mtime=0: the id holds the bytes, and pytest-xdist's workers must collect the same ids
    [("empty.tar", b""), ("empty.tar.gz", b""), ("nothing.tar.gz", gzip.compress(b"", mtime=0))],
)
def test_empty_inputs_count_one_tar_error_each(tmp_path, name, content):
    """A gzip of nothing counted one tar_error while a 0-byte .tar or .tar.gz counted none; none of
    them is a tar (every writer ends an archive with zero blocks): each is one tar_error."""
    path = tmp_path / name
    path.write_bytes(content)
    assert _read(path) == ([], ["tar_error"])
    assert _read(path, payloads=False) == ([], ["tar_error"])


def _three_samples(path):
    with tarfile.open(path, "w") as tar:
        for key in ("c0", "c1", "c2"):
            for ext, size in (("jpg", 700), ("json", 30), ("txt", 20)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(os.urandom(size)))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar}


@pytest.mark.parametrize("compressed", [False, True])
def test_a_tar_cut_at_a_member_boundary_counts_a_tar_error(tmp_path, compressed):
    """Cut just before a header, the shard ended as if complete: nothing counted, and the sample in
    progress (c1 without its txt) was yielded as whole. Now one tar_error; that sample is dropped
    (nothing says it was complete), the ones before it kept, in every read mode."""
    full = tmp_path / "full.tar"
    members = _three_samples(full)
    data = full.read_bytes()
    cut = tmp_path / ("cut.tar.gz" if compressed else "cut.tar")
    for member, kept in (("c1.txt", ["c0"]), ("c2.jpg", ["c0"]), ("c0.json", [])):
        head = data[: members[member].offset]
        cut.write_bytes(gzip.compress(head) if compressed else head)
        for payloads in (True, False, {"json"}):
            assert _read(cut, payloads) == (kept, ["tar_error"]), (member, payloads)
    # The end blocks present (one is enough): whole, nothing counted.
    end = members["c2.txt"].offset_data + 512
    for tail in (data[: end + 512], data):
        cut.write_bytes(gzip.compress(tail) if compressed else tail)
        assert _read(cut) == (["c0", "c1", "c2"], [])


def _write_with_every_writer(folder):
    """The same two samples as tars from Python's tarfile (file and stream mode, gzip), GNU tar
    (gnu and posix formats, gzip) and webdataset's TarWriter (img2dataset's writer)."""
    src = folder / "src"
    src.mkdir()
    for key in ("a", "b"):
        (src / f"{key}.jpg").write_bytes(os.urandom(600))
        (src / f"{key}.txt").write_bytes(b"title " + key.encode())
    files = sorted(p.name for p in src.iterdir())
    for mode, name in (("w", "py.tar"), ("w|", "py_stream.tar"), ("w:gz", "py.tar.gz")):
        with tarfile.open(folder / name, mode) as tar:
            for f in files:
                tar.add(src / f, arcname=f)
    if shutil.which("tar"):
        for fmt, flags, name in (
            ("gnu", "cf", "gnu.tar"),
            ("posix", "cf", "posix.tar"),
            ("gnu", "czf", "gnu.tar.gz"),
        ):
            subprocess.run(
                ["tar", f"--format={fmt}", f"-{flags}", str(folder / name), *files], cwd=src, check=True
            )
    for name in ("wds.tar", "wds.tar.gz"):
        with wds.TarWriter(str(folder / name)) as sink:
            for key in ("a", "b"):
                sink.write({"__key__": key, "jpg": (src / f"{key}.jpg").read_bytes(), "txt": f"title {key}"})
    return [p for p in folder.iterdir() if p.is_file()]


def test_tars_of_every_common_writer_read_whole_without_a_count(tmp_path):
    written = _write_with_every_writer(tmp_path)
    assert len(written) >= 5
    for path in written:
        for payloads in (True, False):
            assert _read(path, payloads) == (["a", "b"], []), path.name
