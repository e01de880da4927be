"""dataset_tools under faults (issue 11): input files that do not parse, truncated shards, tars
without stats. Each asserts a clear message (file and line, or the shard) and nothing accepted
silently. The ladder's faults (HTML, truncated or grey-placeholder variants) are in
tests/test_dataset_tools_fetch.py."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail
from dataset_tools.metadata import read_metadata

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("video_id", pa.string()),
        ("variant", pa.string()),
        ("category_name", pa.string()),
        ("tags", pa.list_(pa.string())),
    ]
)


def _shard(folder, shard_id: int, n: int, stats: bool = True) -> str:
    """A real shard of `n` samples (JPEG, caption, metadata), its parquet and (optionally) stats."""
    name = shards.shard_name(shard_id)
    samples, rows = [], []
    for i in range(n):
        key = f"{name}{i:04d}"
        vid = f"vid{shard_id:02d}{i:06d}"
        meta = {"key": key, "video_id": vid, "title": f"t{i}", "category_name": "Music", "tags": ["a"]}
        samples.append(
            (key, {"jpg": render_thumbnail(vid, "mqdefault"), "txt": b"t", "json": json.dumps(meta).encode()})
        )
        rows.append(
            {
                "key": key,
                "status": "success",
                "video_id": vid,
                "variant": "mqdefault",
                "category_name": "Music",
                "tags": ["a"],
            }
        )
    shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
    if stats:
        shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
        shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))
    return os.path.join(folder, f"{name}.tar")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_csv_with_unterminated_quote_costs_only_its_row(tmp_path):
    # It stopped the whole build ("a double quote opens here and is never closed"): one scraped
    # title that starts with a quote is normal data, so only that line is read as written.
    csv = tmp_path / "videos.csv"
    csv.write_text(
        'video_id,title,tags\nokokokokok1,"fine, quoted",a|b\nokokokokok2,"never closed,x\n'
        "okokokokok3,third,c\n"
    )
    res = read_metadata([str(csv)])
    by_id = {row["video_id"]: row for row in res.rows}
    assert res.input_rows == 3 and not res.rejected
    assert by_id["okokokokok1"]["title"] == "fine, quoted"
    assert (by_id["okokokokok2"]["title"], by_id["okokokokok2"]["tags"]) == ('"never closed', ["x"])
    assert by_id["okokokokok3"]["title"] == "third"


def test_broken_json_array_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "videos.json"
    path.write_text('[\n {"id": "okokokokok1", "title": "a"},\n {"id": "okokokokok2", "title": }\n]\n')
    assert main(["build", "--input", str(path), "--output", str(tmp_path / "out")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:3: not valid JSON")


@pytest.mark.parametrize("cut", ["mid_member", "end_blocks"])
def test_finalize_refuses_truncated_shard(tmp_path, cut):
    _shard(tmp_path, 0, 3)
    tar = _shard(tmp_path, 1, 3)
    size = os.path.getsize(tar)
    # mid_member: a copy that stopped part-way; end_blocks: cut exactly after the last member,
    # which tarfile itself reads without complaint.
    keep = size // 2 if cut == "mid_member" else size - 10240
    with open(tar, "r+b") as fh:
        fh.truncate(keep)
    with pytest.raises(SystemExit) as err:
        main(["finalize", str(tmp_path)])
    message = str(err.value)
    assert "refusing to finalize" in message and "00001.tar" in message and "00001_stats.json" in message
    assert not (tmp_path / "sizes.json").exists()
    assert main(["inspect", str(tmp_path), "--verify"]) == 1


def test_finalize_refuses_shard_with_fewer_samples_than_stats(tmp_path):
    tar = _shard(tmp_path, 0, 3)
    samples = shards.read_tar(tar)
    del samples[sorted(samples)[0]]
    shards.write_tar(tar, samples.items())  # a whole tar, one sample short of its stats
    with pytest.raises(SystemExit, match="00000.tar: holds 2 samples, its stats say 3"):
        main(["finalize", str(tmp_path)])


def test_verify_checks_tars_without_stats(tmp_path, capsys):
    _shard(tmp_path, 0, 2)
    tar = _shard(tmp_path, 1, 2, stats=False)  # a build stopped before its stats, or a copied tar
    assert main(["inspect", str(tmp_path), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    with open(tar, "r+b") as fh:
        fh.truncate(os.path.getsize(tar) // 2)
    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "00001.tar" in out and "truncated" in out


@pytest.mark.parametrize(
    "args,match",
    [
        (["--caption-template", "{title} {nope}"], r"--caption-template .*unknown field\(s\) \['nope'\]"),
        (["--caption-template", "{title"], "--caption-template '{title': expected '}'"),
        (["--caption-template", "{category_id:03d}"], "Unknown format code"),
        (["--shard-size", "0"], "--shard-size 0: must be at least 1"),
        (["--processes", "32"], "--processes 32 is more than --max-connections 16.*Lower --processes"),
        # A typo failed every row of a resumed build; no {video_id}: one image for every video.
        (["--url-template", "http://h/vi/{id}/{variant}.jpg"], r"--url-template .*KeyError\('id'\)"),
        (["--url-template", "http://h/vi/x/{variant}.jpg"], "has no {video_id}, so every video gets one"),
        (["--url-template", "http://h/vi/{video_id}/hq.jpg"], "has no {variant}, so every rung"),
        # Each started the build and then failed every row (or hung it: --threads 0).
        (["--retries", "-1"], "--retries -1: must be 0 .no re-attempt. or more"),
        (["--image-size", "0"], "--image-size 0: must be at least 1"),
        (["--deadline", "0"], "--deadline 0.0: must be more than 0 seconds"),
        (["--threads", "0"], "--threads 0: must be at least 1"),
        (["--encode-quality", "101"], "--encode-quality 101: must be 0 to 100"),
    ],
)
def test_bad_build_options_are_refused_before_anything_runs(tmp_path, args, match):
    # The input does not even exist: the options are checked first, nothing is read or written.
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=match) as err:
        main(["build", "--input", str(tmp_path / "none.csv"), "--output", str(out), *args])
    assert "\n" not in str(err.value) and not out.exists()


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("empty.csv", "", "empty.csv: empty file (no header row). Remove it from --input"),
        ("empty.jsonl", "", "empty.jsonl: no records (empty file)"),
        ("nocol.csv", "foo,bar\n1,2\n", "nocol.csv: no video id column"),
    ],
)
def test_unusable_input_files_are_one_line_errors(tmp_path, capsys, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    assert main(["build", "--input", str(path), "--output", str(tmp_path / "out")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


def test_split_and_dedup_refuse_a_non_empty_output(tmp_path):
    # Shards are numbered from 00000 again: a second run into the same folder left the first
    # run's higher-numbered shards beside the new ones (finalize counted both).
    from dataset_tools import dedup, split

    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3)
    out = tmp_path / "split"
    first = split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=2)
    assert first["train"] + first["val"] == 6
    before = sorted(os.listdir(out / "train"))
    with pytest.raises(SystemExit, match="output folder is not empty.*Pass an empty or new folder"):
        split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=4)
    assert sorted(os.listdir(out / "train")) == before
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / "00005.tar").write_bytes(b"")  # an earlier run's shard
    with pytest.raises(SystemExit, match="filtered: output folder is not empty"):
        dedup.dedup(str(src), filter_output=str(filtered))
    assert dedup.dedup(str(src), filter_output=str(tmp_path / "new"))["kept"] == 6


def _failed_shard(folder, keys_ok, keys_failed):
    """Shard 0 with successes `keys_ok` and failures `keys_failed` (parquet, tar, stats)."""
    rows = [{"key": k, "status": "success", "video_id": k} for k in keys_ok] + [
        {"key": k, "status": "failed_to_download", "error_message": "HTTP Error 503", "video_id": k}
        for k in keys_failed
    ]
    samples = [(k, {"jpg": render_thumbnail(k, "mqdefault"), "txt": b"t", "json": b"{}"}) for k in keys_ok]
    shards.write_tar(os.path.join(folder, "00000.tar"), samples)
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, SCHEMA)
    shards.write_stats(str(folder), 0, shards.stats_from_rows(rows, 0.0, 1.0))


def test_retry_merge_killed_midway_leaves_the_shard_incomplete(tmp_path, monkeypatch):
    from dataset_tools import retry

    out, retry_dir = tmp_path / "out", tmp_path / "retry"
    out.mkdir()
    retry_dir.mkdir()
    _failed_shard(out, ["000000000", "000000001"], ["000000002"])
    _failed_shard(retry_dir, ["000000002"], [])  # the retry pass: the failed row now succeeded

    def killed(*args, **kwargs):  # the merge dies after the tar, before the parquet
        raise RuntimeError("killed")

    monkeypatch.setattr(shards, "write_parquet", killed)
    with pytest.raises(RuntimeError, match="killed"):
        retry.merge_retry(str(out), str(retry_dir), "00000")
    # The tar already holds 3 samples, the parquet and old stats say 2: the shard must not
    # count as complete, so the next build redoes it instead of trusting stale stats.
    assert len(shards.read_tar(str(out / "00000.tar"))) == 3
    assert shards.complete_shards(str(out)) == {}
    monkeypatch.undo()
    _failed_shard(out, ["000000000", "000000001"], ["000000002"])  # a fresh copy of the shard
    stats = retry.merge_retry(str(out), str(retry_dir), "00000")  # an uninterrupted merge
    assert stats["successes"] == 3 and shards.complete_shards(str(out)) == {0: "00000"}
    assert shards.tar_problem(str(out / "00000.tar"), 3) is None


@pytest.mark.parametrize(
    "args,match",
    [
        (["split", "{src}", "--output", "{out}", "--val-fraction", "1"], "1.0: must be strictly"),
        (["split", "{src}", "--output", "{out}", "--val-fraction", "0"], "0.0: must be strictly"),
        (["dedup", "{src}", "--max-distance", "-1"], "--max-distance -1: must be 0"),
    ],
)
def test_bad_split_and_dedup_options_are_one_line_errors(tmp_path, args, match):
    # These were a ValueError and a ZeroDivisionError traceback, after the shards were read.
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _shard(src, 0, 2)
    with pytest.raises(SystemExit, match=match) as err:
        main([a.format(src=src, out=out) for a in args])
    assert "\n" not in str(err.value.code)
    assert not out.exists()


def test_an_input_folder_that_is_also_the_output_is_refused(tmp_path):
    # The first build into its own input folder worked; every later one (a resume,
    # --retry-failed) read the shards' parquet and _stats.json back as metadata and stopped on
    # "00000_stats.json:1: not a JSON line".
    data = tmp_path / "data"
    data.mkdir()
    (data / "USvideos.csv").write_text("video_id,title\nokokokokok1,a title\n")
    _shard(data, 0, 2)  # what the first build left there
    before = sorted(os.listdir(data))
    with pytest.raises(SystemExit, match="is also --output.*Give another --output") as err:
        main(["build", "--input", str(data), "--output", str(data) + "/"])
    assert "\n" not in str(err.value.code)
    assert sorted(os.listdir(data)) == before  # refused before anything was written


def test_a_retry_that_did_not_complete_stays_failed_and_exits_2(tmp_path):
    # A retried shard whose download did not complete (a worker killed) was reported as "run
    # again" and the build still exited 0, so a script took the failed rows as final.
    from dataset_tools.build import exit_code, merge_retries

    out, retry_dir = tmp_path / "out", tmp_path / "retry"
    out.mkdir()
    retry_dir.mkdir()
    _failed_shard(out, ["000000000"], ["000000001"])
    _failed_shard(retry_dir, ["000000001"], [])
    os.remove(retry_dir / "00000_stats.json")  # the retry pass died before its stats
    assert merge_retries(str(out), str(retry_dir), [0], oom_shard_count=5) == ["00000"]
    assert shards.complete_shards(str(out)) == {0: "00000"}
    assert len(shards.read_tar(str(out / "00000.tar"))) == 1  # nothing half-merged
    assert exit_code({"incomplete_shards": 0, "incomplete_retries": 1}) == 2
    assert exit_code({"incomplete_shards": 0, "incomplete_retries": 0}) == 0
