"""dataset_tools build and shard reading, fifth review: a ``NNNNN_stats.json`` that parses but is
not a build's stats file is redone by the next build (it was a KeyError/TypeError traceback out of
the build's totals); ``read_tar`` and ``tar_problem`` name and group a tar's members as the trainer
does (directories kept in the key, extensions lower-cased, members without one skipped).

Runtime: ~8 s (real builds against the loopback fake host; real tars read by the trainer's reader).
"""

import io
import json
import tarfile

from small_builds import write_ids_csv
from test_review_dataset_build3 import _args as _build_args

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost
from vutrain.data.samples import iter_raw_samples


def test_build_redoes_a_shard_whose_stats_file_is_not_a_build_stats_file(tmp_path, capsys):
    ids = [f"vid{i:08d}" for i in range(6)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_build_args(host.url_template, inp, out)) == 0
        good = {name: json.loads((out / f"{name}_stats.json").read_text()) for name in ("00000", "00001")}
        totals = json.loads((out / "_build" / "summary.json").read_text())
        # They parse, so the shards counted as built: `{}` was a KeyError, `[]` a TypeError traceback.
        (out / "00000_stats.json").write_text("{}")
        (out / "00001_stats.json").write_text("[]")
        capsys.readouterr()
        assert main(_build_args(host.url_template, inp, out)) == 0
    said = capsys.readouterr().out
    for name in ("00000", "00001"):
        assert f"{name}_stats.json" in said and f"shard {name} is downloaded again" in said
        redone = json.loads((out / f"{name}_stats.json").read_text())
        assert shards.stats_problem(name, redone) is None
        assert redone["successes"] == good[name]["successes"]
    summary = json.loads((out / "_build" / "summary.json").read_text())
    assert (summary["rows"], summary["successes"]) == (totals["rows"], totals["successes"])
    assert summary["incomplete_shards"] == 0


def test_stats_problem_takes_a_build_stats_file_only():
    built = shards.stats_from_rows([{"status": "success"}, {"status": "x", "error_message": "404"}], 0, 1)
    assert shards.stats_problem("00000", built) is None
    foreign = [{}, [], {"successes": "4", "count": 4}, {"successes": 5, "count": 4}]
    foreign.append({"successes": 2, "count": 4, "status_dict": ["success"]})
    for stats in foreign:
        problem = shards.stats_problem("00000", stats)
        assert problem.startswith("00000_stats.json") and "not a build stats file" in problem


def _tar_of(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _as_trainer_reads(path) -> dict[str, dict[str, bytes]]:
    return {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in iter_raw_samples(str(path))
    }


def test_read_tar_groups_members_as_the_trainer_does(tmp_path):
    # Keyed by basename, x/a and y/a were one sample in split, dedup and inspect (two in training);
    # a.JPG was not the image the trainer reads; README (no extension) was a sample of its own.
    path = tmp_path / "00000.tar"
    members = [
        ("x/a.jpg", b"xa-image"),
        ("x/a.txt", b"xa-caption"),
        ("y/a.jpg", b"ya-image"),
        ("y/a.txt", b"ya-caption"),
        ("b.JPG", b"b-image"),
        ("b.Txt", b"b-caption"),
        ("c.seg.json", b"{}"),
        ("c.jpg", b"c-image"),
        ("README", b"not a sample"),
    ]
    _tar_of(path, members)
    trainer = _as_trainer_reads(path)
    assert sorted(trainer) == ["b", "c", "x/a", "y/a"]
    assert shards.read_tar(str(path)) == trainer
    assert shards.tar_problem(str(path), expected_samples=len(trainer)) is None


def test_a_tar_rewritten_from_read_tar_reads_the_same_in_training(tmp_path):
    src, copy = tmp_path / "src.tar", tmp_path / "copy.tar"
    _tar_of(src, [("x/a.jpg", b"1"), ("x/a.txt", b"t1"), ("y/a.JPEG", b"2"), ("y/a.txt", b"t2")])
    shards.write_tar(str(copy), list(shards.read_tar(str(src)).items()))
    assert _as_trainer_reads(copy) == {
        "x/a": {"jpg": b"1", "txt": b"t1"},
        "y/a": {"jpeg": b"2", "txt": b"t2"},
    }
