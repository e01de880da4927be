"""Review of metrics and plots: a long run's metrics.jsonl is read row by row, not held at once."""

from __future__ import annotations

import json
import os
import tracemalloc
import warnings

import pytest
from run_rows import TRAIN_KEYS

from vutrain.metrics import MetricsWriter, logged_eval, read_metrics
from vutrain.plots import plot_run

ROWS = 12_000


def _write_long_run(run_dir: str) -> None:
    """ROWS training rows, with an eval row every 1000 steps (the last one at ROWS)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        for step in range(1, ROWS + 1):
            values = {key: step * 1e-3 + i for i, key in enumerate(TRAIN_KEYS)}
            fh.write(json.dumps({"step": step, **values}) + "\n")
            if step % 1000 == 0:
                fh.write(json.dumps({"step": step, "eval/i2t_r1": 0.5, "eval/zeroshot_top1": 0.25}) + "\n")


def _peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("long_run"))
    _write_long_run(run_dir)
    warm = str(tmp_path_factory.mktemp("warm"))  # matplotlib's first draw builds caches: not ours
    with open(os.path.join(warm, "metrics.jsonl"), "w") as fh:
        fh.write('{"step": 1, "train/loss": 1.0}\n')
    plot_run(warm)
    all_rows, rows = _peak_bytes(read_metrics, run_dir)
    assert len(rows) == ROWS + ROWS // 1000
    return run_dir, all_rows


def test_final_eval_lookup_reads_row_by_row(long_run):
    run_dir, all_rows = long_run
    peak, found = _peak_bytes(logged_eval, run_dir, ROWS)
    assert found == {"eval/i2t_r1": 0.5, "eval/zeroshot_top1": 0.25}
    assert peak < all_rows / 10, (peak, all_rows)


def test_curves_png_keeps_only_the_drawn_values(long_run):
    run_dir, all_rows = long_run
    peak, path = _peak_bytes(plot_run, run_dir)
    assert path is not None and os.path.getsize(path) > 0
    assert peak < all_rows / 3, (peak, all_rows)


def test_resume_streams_the_kept_rows_and_moves_the_rest(tmp_path):
    run_dir = str(tmp_path)
    _write_long_run(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "ab") as fh:
        fh.write(b'{"step": 7, "note": "caf\xe9"}\n')  # a Latin-1 row: kept byte for byte
        fh.write(b"\xff\xfe junk\n")  # bytes that are no UTF-8: a torn line
        fh.write(b'{"step": 12001, "train/lo')  # torn by a kill mid-write
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        lines = fh.readlines()
    kept_expected = []
    for line in lines[:-2]:  # the junk and the torn last line move out
        row = json.loads(line)
        if row["step"] < 6000 or (row["step"] == 6000 and "eval/i2t_r1" not in row):
            kept_expected.append(line)
    size = os.path.getsize(path)
    writer = MetricsWriter(run_dir, enabled=True)
    writer.close()
    writer._tb = None  # TensorBoard's purge is not what this test measures
    peak, moved = _peak_bytes(writer.truncate_after, 6000, eval_owed=True)
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        kept = fh.readlines()
    # eval_owed: the eval row of step 6000 moves out with the rows after it and the torn line
    assert kept == kept_expected
    assert moved == len(lines) - len(kept)
    with open(os.path.join(run_dir, "metrics.discarded.jsonl"), encoding="utf-8") as fh:
        discarded = [json.loads(line) for line in fh]
    assert len(discarded) == moved and discarded[-1]["torn_line"] == '{"step": 12001, "train/lo'
    assert sum("torn_line" in row for row in discarded) == 2
    assert kept[-1] == '{"step": 7, "note": "caf\udce9"}\n'
    assert not os.path.exists(path + ".tmp")
    assert peak < size / 4, (peak, size)


@pytest.mark.parametrize(
    "row",
    [
        {"step": 5, "eval/num_samples": 10.0, "eval/skipped_samples": 0.0},
        {"step": 5, "eval/i2t_r1": float("nan")},
    ],
)
def test_eval_rows_with_nothing_to_draw_give_no_matplotlib_warning(tmp_path, row):
    with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as fh:
        fh.write('{"step": 4, "train/loss": 2.0}\n' + json.dumps(row, allow_nan=True) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_run(str(tmp_path)) is not None
