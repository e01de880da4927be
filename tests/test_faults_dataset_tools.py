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


def test_csv_with_unterminated_quote_names_file_and_line(tmp_path, capsys):
    csv = tmp_path / "videos.csv"
    csv.write_text(
        'video_id,title,tags\nokokokokok1,"fine, quoted",a|b\nokokokokok2,"never closed,x\n'
        "okokokokok3,third,c\n"
    )
    code = main(["build", "--input", str(csv), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert _error_lines(err) == [
        f"error: {csv}:3: cannot parse as CSV (a double quote opens here and is "
        "never closed). Fix or remove that row, then run the same command again."
    ]


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
