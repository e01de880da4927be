"""Command-line edges of the training benchmark, its report and the demo: markdown cells, outputs
that cannot be written, thresholds that cannot be judged."""

from __future__ import annotations

import os
import re

import pytest

from vutrain import bench, bench_report, demo

HEADER_CELLS = bench.table([]).splitlines()[0].count("|")


def cells(line: str) -> list[str]:
    """A markdown row's cells, split at unescaped pipes as a markdown renderer does."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def failed_row(error: str) -> dict:
    return dict(preset="tiny", precision="fp32", zero_stage=2, batch_size=4, grad_ckpt="false", error=error)


def test_bench_failed_row_with_pipe_or_newline_keeps_its_columns():
    line = bench.table([failed_row("ValueError: a | b\nc")]).splitlines()[-1]
    assert len(cells(line)) == HEADER_CELLS - 1
    assert "\n" not in line and "a \\| b c" in line


def test_compare_report_error_cells_keep_their_columns(tmp_path, capsys):
    row = {"variant": "vutrain", "side": "vutrain", "batch_size": 8, "error": "RuntimeError: x | y\nz"}
    assert len(cells(bench_report.format_row(row))) == 6
    result = {
        "rows": [row],
        "largest": [
            {"variant": "open_clip", "side": "open_clip", "skipped": "failed | twice"},
            {"variant": "vutrain", "side": "vutrain", "largest_batch": 8, "probes": [8], "error": "a|b"},
        ],
        "targets": [],
        "device": "CPU",
        "preset": "tiny",
        "precision": "fp32",
        "date": "2026-12-06",
    }
    bench_report.report(result, str(tmp_path / "r.json"), str(tmp_path / "r.png"))
    printed = capsys.readouterr().out.splitlines()
    rows = [line for line in printed if line.startswith("| ") and not line.startswith("| configuration")]
    assert [len(cells(line)) for line in rows] == [6, 4, 4], rows


def test_bench_out_folder_that_cannot_be_made_is_one_line_before_the_shards(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(blocker / "rows.json"), "--batch-sizes", "4", "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err and "--out" in err and "pass another --out" in err


def test_demo_marker_that_cannot_be_written_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # A dangling link where the marker goes: the folder exists, but the marker cannot be written.
    os.symlink(tmp_path / "missing" / "marker", out / demo.DEMO_MARKER)
    code = demo.main(["--out", str(out), "--device", "cpu", "--num-samples", "128", "--shard-size", "32"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: --out") and "pass another --out" in err and "Traceback" not in err


def test_demo_data_that_cannot_be_written_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / demo.DEMO_MARKER).write_text("the demo's\n")
    (out / "data").write_text("a file where the demo's data/ folder goes\n")
    code = demo.main(["--out", str(out), "--device", "cpu", "--num-samples", "128", "--shard-size", "32"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: cannot write the synthetic shards") and "Traceback" not in err


@pytest.mark.parametrize("threshold", ["nan", "inf", "-0.1", "1.5", "high"])
def test_demo_min_top1_must_be_a_fraction(threshold, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("stops the demo before training should the threshold be accepted\n")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--min-top1", threshold, "--device", "cpu", "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert "--min-top1" in capsys.readouterr().err


def test_demo_min_top1_accepts_the_ends_of_the_range(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("stops the demo before training\n")
    for threshold in ("0", "1"):
        assert demo.main(["--min-top1", threshold, "--device", "cpu", "--out", str(blocker / "out")]) == 1
        assert "error: --out" in capsys.readouterr().err
