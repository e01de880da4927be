"""Review of curves.png: a hand-merged metrics.jsonl (steps out of order, a step logged twice)."""

from __future__ import annotations

import math

from test_review_metrics import _plot_and_keep_figure, _write_rows


def _drawn_lines(run_dir: str, monkeypatch) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """plot_run on `run_dir` (the real PNG written): {(panel title, line label): its points}."""
    fig = _plot_and_keep_figure(run_dir, monkeypatch)
    return {
        (axis.get_title(), line.get_label()): [
            (float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())
        ]
        for axis in fig.axes
        for line in axis.lines
    }


def _loss(lines: dict) -> list[tuple[float, float]]:
    (points,) = [points for (title, _), points in lines.items() if title == "training loss"]
    return points


def test_curves_of_a_hand_merged_file_are_drawn_in_step_order_one_point_per_step(tmp_path, monkeypatch):
    """A run's rows to step 30, then a resume's rows from step 10 appended after them (no
    truncate_after: a file merged by hand). The loss line went 10, 20, 30 and back to 20, 30, 40, an
    eval line back from 30 to 10, each drawing both rows of a step. Now each curve is in step order
    with one point per step, the last row for a step winning, as a resume keeps the resumed rows."""
    rows = [{"step": s, "train/loss": 3.0 - s * 0.1} for s in (10, 20, 30)]
    rows += [{"step": 20, "eval/zeroshot_top1": 0.2}, {"step": 30, "eval/zeroshot_top1": 0.3}]
    rows += [{"step": s, "train/loss": 2.0 - s * 0.01} for s in (20, 30, 40)]
    rows += [{"step": 10, "eval/zeroshot_top1": 0.1}, {"step": 30, "eval/zeroshot_top1": 0.35}]
    _write_rows(str(tmp_path), rows)
    lines = _drawn_lines(str(tmp_path), monkeypatch)
    assert _loss(lines) == [(10, 2.0), (20, 1.8), (30, 1.7), (40, 1.6)]
    assert lines[("evaluation", "zeroshot_top1")] == [(10, 0.1), (20, 0.2), (30, 0.35)]


def test_a_later_nan_row_for_a_step_replaces_the_earlier_value(tmp_path, monkeypatch):
    """Two runs concatenated: the second run's interval at step 20 had every micro-batch skipped
    (NaN loss). That row stands for step 20, so the line leaves step 20 out (as it leaves out any NaN)
    instead of drawing the first run's value there, out of order."""
    rows = [{"step": s, "train/loss": 5.0} for s in (10, 20, 30)]
    rows += [
        {"step": 10, "train/loss": 1.0},
        {"step": 20, "train/loss": math.nan},
        {"step": 30, "train/loss": 0.5},
    ]
    _write_rows(str(tmp_path), rows)
    assert _loss(_drawn_lines(str(tmp_path), monkeypatch)) == [(10, 1.0), (30, 0.5)]


def test_the_chance_line_is_the_latest_steps_not_the_last_rows(tmp_path, monkeypatch):
    """The zero-shot chance line was read from the file's last eval row: in a hand-merged file whose
    last row is another run's earlier step (another class count), the line showed that run's chance."""
    rows = [{"step": 30, "eval/zeroshot_top1": 0.3, "eval/zeroshot_chance": 0.25}]
    rows += [{"step": 10, "eval/zeroshot_top1": 0.1, "eval/zeroshot_chance": 0.5}]
    _write_rows(str(tmp_path), rows)
    lines = _drawn_lines(str(tmp_path), monkeypatch)
    assert {y for _, y in lines[("evaluation", "zero-shot chance")]} == {0.25}
