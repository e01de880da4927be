"""What a run logs, with real Trainers in this process (world 1, tests/inprocess_trainer.py) and
real metrics files.

- A run stopped by NonFiniteLossError writes the row of its last, unfinished logging interval
  (the losses and non-finite count that show the divergence) before it raises. Before: the
  check raised first, and with train.log_every > 1 (or on a logging step) the row was lost.
- curves.png draws the multi-label eval curves (eval/tags_map, eval/tags_r*) when metrics.jsonl
  holds them, beside zero-shot and retrieval. Before: left out.
- A resume's warning about the rows moved to metrics.discarded.jsonl says what moved: rows after
  the resume step, the resume step's owed eval row, torn lines. Before: a torn last line at the
  resume step was reported as "1 row(s) after step N".
"""

from __future__ import annotations

import json
import logging
import re

import pytest
from run_rows import metrics_rows
from test_review_metrics import _plot_and_keep_figure, _write_rows

from inprocess_trainer import train


def _nan_loss_from(step: int):
    """on_trainer hook: every loss from (1-based) `step` on is NaN (during step n, trainer.step is n - 1)."""

    def hook(trainer) -> None:
        inner = trainer.loss_fn.forward

        def loss(*args, **kwargs):
            value = inner(*args, **kwargs)
            return value * float("nan") if trainer.step + 1 >= step else value

        trainer.loss_fn.forward = loss

    return hook


@pytest.mark.parametrize("log_every", [1, 5])
def test_a_nonfinite_stop_writes_its_unfinished_interval_row_first(
    tiny_shards, tmp_path, single_process, log_every
):
    """NaN losses from step 2 with train.max_nonfinite_steps=2 stop the run before step 5: the
    last row of metrics.jsonl is at the step the error names and counts the skipped
    micro-batches of its interval (with log_every=1 the stopping step's own row was lost; with
    log_every=5 the file had no row at all)."""
    from vutrain.trainer import NonFiniteLossError

    run_dir = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row") as failure:
        train(
            tiny_shards,
            run_dir,
            steps=8,
            on_trainer=_nan_loss_from(2),
            train__max_nonfinite_steps=2,
            train__log_every=log_every,
            train__checkpoint_every=0,
            eval__every=0,
            data__val_shards="",
        )
    stopped_at = int(re.search(r"by step (\d+)", str(failure.value)).group(1))
    rows = [r for r in metrics_rows(run_dir) if "train/loss" in r]
    assert rows and rows[-1]["step"] == stopped_at, (stopped_at, rows)
    assert sum(r["train/nonfinite_skipped"] for r in rows) == stopped_at - 1, rows


def _drawn_eval_labels(run_dir: str, monkeypatch) -> list[str]:
    """plot_run on `run_dir`, with the legend labels of the eval panel of the Figure it saved."""
    return _plot_and_keep_figure(run_dir, monkeypatch).axes[1].get_legend_handles_labels()[1]


def test_curves_png_draws_the_multilabel_eval_keys(tmp_path, monkeypatch):
    """A run whose eval logged zero-shot, retrieval and tag metrics: the eval panel has a curve
    for tags_map, tags_r1, tags_r5 and tags_r10 beside zero-shot and retrieval, none for the
    tags_vocab count; a run without tags draws no tags curve."""
    rows = [{"step": s, "train/loss": 5.0 - s} for s in (1, 2, 3, 4)]
    for step in (2, 4):
        scores = {"eval/zeroshot_top1": 0.1, "eval/i2t_r1": 0.2, "eval/t2i_r1": 0.2}
        scores.update({"eval/tags_map": 0.3, "eval/tags_r10": 0.6, "eval/tags_r5": 0.5, "eval/tags_r1": 0.4})
        rows.append(dict(step=step, **scores, **{"eval/tags_vocab": 40.0}))
    with_tags, without = tmp_path / "tags", tmp_path / "plain"
    for run_dir, keep in ((with_tags, lambda k: True), (without, lambda k: "tags" not in k)):
        run_dir.mkdir()
        _write_rows(str(run_dir), [{k: v for k, v in row.items() if keep(k)} for row in rows])
    labels = _drawn_eval_labels(str(with_tags), monkeypatch)
    assert labels[:3] == ["zeroshot_top1", "i2t_r1", "t2i_r1"], labels
    assert labels[3:] == ["tags_map", "tags_r1", "tags_r5", "tags_r10"], labels
    assert not any("tags" in label for label in _drawn_eval_labels(str(without), monkeypatch))


def _truncate_warning(run_dir, lines: list[str], step: int, caplog, eval_owed: bool = False) -> str:
    from vutrain.metrics import MetricsWriter

    (run_dir / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        MetricsWriter(str(run_dir), enabled=True).truncate_after(step, eval_owed=eval_owed)
    warned = [r.getMessage() for r in caplog.records if "metrics.discarded.jsonl" in r.getMessage()]
    assert len(warned) == 1, warned
    return warned[0]


def test_the_resume_warning_says_what_moved(tmp_path, caplog):
    """Rows to step 4 and a line torn at its end, resumed at 4: the warning counts 1 torn line and no
    row after step 4; with 2 rows after step 4 and step 4's owed eval row too, it counts each."""
    rows = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2, 3, 4)]
    torn = '{"step": 4, "eval/i2t_r1": 0.'
    message = _truncate_warning(tmp_path, rows + [torn], 4, caplog)
    assert "1 torn line(s)" in message and "after step" not in message, message
    assert message.endswith("(the run resumed from step 4)"), message
    later = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (5, 6)]
    owed = json.dumps({"step": 4, "eval/i2t_r1": 0.5}) + "\n"
    message = _truncate_warning(tmp_path, rows + [owed] + later + [torn], 4, caplog, eval_owed=True)
    assert "2 row(s) after step 4" in message and "1 eval row(s) of step 4" in message, message
    assert "1 torn line(s)" in message, message
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(discarded) == 5, discarded  # 1 + (1 + 2 + 1): nothing lost
