"""The PNG written at the end of a run: training loss and the eval curves.

python -m vutrain.plots RUN_DIR   draws RUN_DIR/curves.png again from RUN_DIR/metrics.jsonl
"""

from __future__ import annotations

import argparse
import logging
import math
import numbers
import os
import sys

from vutrain.metrics import iter_metrics

log = logging.getLogger(__name__)

RETRIEVAL_KEYS = ("eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5")


def _eval_curve_keys(evals: list[dict]) -> list[str]:
    """The eval keys drawn: zero-shot and retrieval, then the multi-label ones the rows hold
    (eval/tags_map, eval/tags_r{k} by k; eval/tags_vocab is a count, not a score). A run with tags
    in its validation shards logged them, but curves.png left them out."""
    present = {key for row in evals for key in row}
    tag_recalls = sorted(
        (key for key in present if key.startswith("eval/tags_r") and key[len("eval/tags_r") :].isdigit()),
        key=lambda key: int(key[len("eval/tags_r") :]),
    )
    tag_keys = (["eval/tags_map"] if "eval/tags_map" in present else []) + tag_recalls
    return [key for key in RETRIEVAL_KEYS if key in present] + tag_keys


def _as_number(value) -> float | None:
    """`value` as a float, or None where it is no number (null, text, a list, a bool); "2.0" reads as
    2.0, as a step written "4" reads as 4. In a hand-edited or foreign row, a null zero-shot chance
    or an object value raised TypeError and the whole plot was lost, and one value written "2.0"
    put every loss of the panel on a text axis, in the order met."""
    try:
        if isinstance(value, str):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        return float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond a float's range
        return None


def _curve(rows: list[dict], key: str, unusable: list[int]) -> list[tuple[int, float]]:
    """(step, value) of the rows holding `key`, in step order, one point per step; a value that is
    no number adds to `unusable[0]`. Non-finite values (a NaN loss: an interval whose micro-batches
    were all skipped) are left out: the line joins the finite points around them, where a NaN broke
    it and a finite point between two NaNs, drawn as a segment of length zero, did not show."""
    values: dict[int, float | None] = {}
    for row in rows:
        _add_point(values, row, key, unusable)
    return _in_step_order(values)


def _add_point(values: dict[int, float | None], row: dict, key: str, unusable: list[int]) -> None:
    """Set `values[step]` to `row`'s `key` as `_curve` takes it (None where it is no number). The
    last row for a step wins, as a resume keeps one row per step: a hand-merged metrics.jsonl (two
    runs concatenated, a resume's rows appended after later ones) was drawn in file order, a line
    that zigzagged back in steps and drew both rows of a step."""
    if key not in row:
        return
    value = _as_number(row[key])
    if value is None:
        unusable[0] += 1
    values[row["step"]] = value


def _in_step_order(values: dict[int, float | None]) -> list[tuple[int, float]]:
    """The finite (step, value) points of `values`, by step."""
    return [
        (step, value) for step, value in sorted(values.items()) if value is not None and math.isfinite(value)
    ]


def _read_curves(run_dir: str, unusable: list[int]) -> tuple[list[tuple[int, float]], list[dict], bool]:
    """The loss points, the eval rows (their eval keys only) and whether any row was read, in one
    pass that keeps nothing else: every row of a long run's metrics.jsonl held at once (10^6 rows,
    ~3 GB) was read at the end of the run, on rank 0 beside the model."""
    loss: dict[int, float | None] = {}
    evals, any_row = [], False
    for row in iter_metrics(run_dir):
        any_row = True
        _add_point(loss, row, "train/loss", unusable)
        eval_keys = {key: value for key, value in row.items() if key.startswith("eval/")}
        if eval_keys:
            evals.append(dict(eval_keys, step=row["step"]))
    return _in_step_order(loss), evals, any_row


def _draw(axis, points: list[tuple[int, float]], **style) -> None:
    """A line through `points`, with a marker when it is a single point: a run of fewer steps than
    train.log_every (one training row) had an empty loss panel, a line of one point has no length."""
    if points:
        if len(points) == 1:
            style.setdefault("marker", "o")
        axis.plot(*zip(*points), **style)


def plot_run(run_dir: str, out_name: str = "curves.png") -> str | None:
    """Plot the loss and eval curves to ``run_dir/out_name``; returns its path (None without metrics)."""
    unusable = [0]
    loss, evals, any_row = _read_curves(run_dir, unusable)
    if not any_row:
        return None
    # A Figure of its own, not pyplot's: `matplotlib.use("Agg")` switched the backend of the
    # process, and a notebook or script that trained and then plotted lost its own backend
    # (inline plots stopped showing). A bare Figure draws with Agg and touches no global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    _draw(axes[0], loss, lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    for key in _eval_curve_keys(evals):
        _draw(axes[1], _curve(evals, key, unusable), marker="o", label=key.split("/", 1)[1])
    # The latest step's chance, not the file's last row's: in a hand-merged file that row may be
    # another run's at an earlier step. A chance that is no number counts as left out.
    chance = _curve(evals, "eval/zeroshot_chance", unusable)
    if chance:
        axes[1].axhline(chance[-1][1], ls="--", c="grey", label="zero-shot chance")
    if unusable[0]:
        path = os.path.join(run_dir, "metrics.jsonl")
        log.warning("%s: %d value(s) that are no number left out of %s", path, unusable[0], out_name)
    axes[1].set(title="evaluation", xlabel="step", ylim=(0, 1))
    # Eval rows with no curve to draw (only counts, or every score NaN) made matplotlib warn "No
    # artists with labels found to put in legend" at the end of the run, a warning that named nothing.
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, out_name)
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    """Draw a run's curves.png from its metrics.jsonl (one a run left missing: a Ctrl-C while it
    drew, a full disk); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m vutrain.plots", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run's output_dir, which holds metrics.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        path = plot_run(args.run_dir)
    except OSError as exc:  # a read-only run directory, a full disk: one line, not a traceback
        print(f"error: curves.png not written in {args.run_dir}: {exc}", file=sys.stderr)
        return 1
    if path is None:
        where = os.path.join(args.run_dir, "metrics.jsonl")
        print(f"error: {where} is missing or has no rows: nothing to draw", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
