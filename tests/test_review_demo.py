"""Review tests: the demo's --seed, and the synthetic writer re-run into a folder written before its
marker existed (real files, real tars from this writer, Python's tarfile and webdataset's TarWriter)."""

import io
import json
import os
import tarfile

import pytest
import webdataset as wds

from vutrain import demo
from vutrain.data.synthetic import SYNTHETIC_MARKER, main, write_synthetic


def _tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found


def _pre_marker_output(out):
    """What the writer left before 2026-12-06: its shards, no ``.vutrain_synthetic``."""
    write_synthetic(str(out), 12, 4, image_size=8, seed=3, val_samples=4)
    os.remove(out / SYNTHETIC_MARKER)


def test_demo_negative_seed_is_one_argparse_line_and_touches_nothing(tmp_path, capsys):
    """--seed -1 was a ValueError traceback from the synthetic writer, after the demo had claimed
    --out (and, on a re-run, deleted the previous data). Now argparse's one line, exit code 2."""
    out = tmp_path / "demo out"
    args = ["--device", "cpu", "--out", str(out), "--num-samples", "64", "--shard-size", "16", "--seed", "-1"]
    with pytest.raises(SystemExit) as exc:
        demo.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: -1 is negative; pass a seed >= 0" in err and "Traceback" not in err
    assert not out.exists()


def test_a_synthetic_folder_written_before_the_marker_is_replaced(tmp_path, capsys):
    """Such a folder was refused ("files the synthetic writer did not write here") although every
    file in it was the writer's: its tars carry the writer's fingerprint, so it is replaced whole."""
    _pre_marker_output(tmp_path)
    info = main(["--out", str(tmp_path), "--num-samples", "4", "--shard-size", "2", "--image-size", "8"])
    assert info["num_samples"] == 4
    train = sorted(p.name for p in (tmp_path / "train").glob("*.tar"))
    assert train == ["00000.tar", "00001.tar"] and (tmp_path / SYNTHETIC_MARKER).exists()
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2}
    assert "data.train_shards=" in capsys.readouterr().out


def _img2dataset_tar(path):
    """A shard as img2dataset writes it (webdataset's TarWriter), under a name the writer gives."""
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "000004", "jpg": b"\xff\xd8 photo", "json": {"key": "000004"}, "txt": "hi"})


def _plain_tar(path, mtime, category="red circle"):
    """Samples with the writer's member names from Python's tarfile, ``mtime`` and ``category``."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for ext, payload in (
            ("jpg", b"x"),
            ("json", json.dumps({"key": "000000", "category_name": category})),
        ):
            data = payload.encode() if isinstance(payload, str) else payload
            info = tarfile.TarInfo(f"000000.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o444
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "intruder",
    ["img2dataset_tar", "tar_at_write_time", "tar_of_other_classes", "cut_tar", "stats_without_tar"],
)
def test_an_unmarked_folder_with_anything_not_the_writers_is_refused_untouched(tmp_path, intruder):
    """Recognising the old output by its tars must not remove anyone else's shard: one file that is
    not the writer's (a webdataset TarWriter tar, the writer's names at the write time, a forged
    tar of other classes, a cut tar, a stats file with no tar of ours) refuses the whole run."""
    _pre_marker_output(tmp_path)
    train = tmp_path / "train"
    if intruder == "img2dataset_tar":
        _img2dataset_tar(train / "00007.tar")
    elif intruder == "tar_at_write_time":
        _plain_tar(train / "00007.tar", mtime=1_700_000_000)
    elif intruder == "tar_of_other_classes":
        _plain_tar(train / "00007.tar", mtime=1_500_000_000, category="a cat")
    elif intruder == "cut_tar":
        (train / "00002.tar").write_bytes((train / "00002.tar").read_bytes()[:1000])
    else:
        (train / "00007_stats.json").write_text('{"successes": 3}')
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="pass an empty or new output folder"):
        write_synthetic(str(tmp_path), 4, 2, image_size=8, val_samples=0)
    assert _tree(tmp_path) == before


def test_an_unmarked_folder_of_counts_only_is_refused(tmp_path):
    """sizes.json and __len__ alone (dataset_tools finalize writes them too) prove nothing."""
    train = tmp_path / "train"
    train.mkdir()
    (train / "sizes.json").write_text('{"00000.tar": 5}')
    (train / "__len__").write_text("5\n")
    with pytest.raises(FileExistsError, match="__len__, sizes.json"):
        write_synthetic(str(tmp_path), 4, 2, image_size=8, val_samples=0)
    assert sorted(p.name for p in train.iterdir()) == ["__len__", "sizes.json"]
