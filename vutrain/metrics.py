"""metrics.jsonl (one JSON object per line, always with "step"), TensorBoard when installed."""

from __future__ import annotations

import collections
import json
import logging
import math
import numbers
import os

import torch

log = logging.getLogger(__name__)

# Bytes that are no UTF-8 (a line torn by a crash that left garbage, a file edited in Latin-1) made
# reading raise UnicodeDecodeError: the resume and curves.png failed with a traceback. Read as
# surrogates, such a line is skipped as torn, and a kept line is written back byte for byte.
_UNDECODABLE = "surrogateescape"


class MetricsWriter:
    """Writes on rank 0 only; other ranks get a no-op writer so call sites need no rank checks."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._tb_dir = os.path.join(run_dir, "tensorboard")
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        except Exception:  # tensorboard is optional: metrics.jsonl is the record
            self._tb = None

    def truncate_after(self, step: int, eval_owed: bool = False) -> int:
        """On resume, keep rows up to `step` so each step appears once; returns rows moved out.

        Rows past `step` belong to the segment a crash lost; they move to
        metrics.discarded.jsonl (tagged with the step the run resumed from), and a line torn by a
        kill mid-write moves there as text. Rewritten through a temporary file and a rename, under a
        marker file that lets the next resume settle a kill in between (each row moves out once).
        TensorBoard's events past `step` are hidden the same way (`purge_step`): before, the lost
        segment's curve stayed there beside the resumed run's.

        eval_owed: the checkpoint at `step` owes that step's eval (a pre-emption came before it),
        which the resumed run runs first: an eval row at `step` was written by an earlier resume
        that ran it and died before its next checkpoint, and moves out too (it was logged twice).
        """
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(self._tb_dir, purge_step=step + 1)
        if not (self.enabled and os.path.exists(self.path)):
            return 0
        # Streamed, kept lines to the temporary file and moved ones to metrics.discarded.jsonl: the
        # kept lines (a 10^6-row file is ~800 MB) and the moved rows (a roll-back to an early
        # checkpoint) were held in memory, beside the trained model on rank 0.
        tmp = self.path + ".tmp"
        discarded_path = os.path.join(os.path.dirname(self.path), "metrics.discarded.jsonl")
        marker = self.path + ".resuming"
        _finish_interrupted_split(marker, tmp, discarded_path)
        _write_marker(marker, discarded_path)
        moved = _split_at_resume(self.path, tmp, discarded_path, step, eval_owed)
        if moved:
            log.warning(
                "metrics.jsonl: %s moved to metrics.discarded.jsonl (the run resumed from step %d)",
                _what_moved(moved, step),
                step,
            )
        os.replace(tmp, self.path)
        os.remove(marker)  # only now: the moved rows are in metrics.discarded.jsonl alone
        return sum(moved.values())

    def write(self, step: int, values: dict) -> None:
        """Append one row {"step": step, **values} (numbers as floats) and mirror it to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step)}  # a numpy or tensor step too
        row.update({key: _as_json_value(value) for key, value in values.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            # SummaryWriter queues events for up to 120 s and writes them from a daemon thread: a
            # run that ended another way than `close()` (pre-empted, NonFiniteLossError, killed)
            # lost its last rows' events though metrics.jsonl had them. A row comes every
            # train.log_every steps, so one flush per row costs nothing.
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard (metrics.jsonl is closed after every row)."""
        if self._tb is not None:
            self._tb.close()


class IntervalTermMeans:
    """The loss's extra terms (align_uniform's align and uniform) over a logging interval, as
    train/loss is: the mean over the interval's good micro-batches, a skipped one left out.

    Summed on the device after each agreement, read on the host once per logged row. The row took
    the logging step's last micro-batch instead, beside an interval-mean train/loss: with
    train.log_every > 1 or grad_accum_steps > 1 the two disagreed, and one noisy micro-batch
    stood for the interval."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, terms: dict, skipped: torch.Tensor, micro_batches: int = 1) -> None:
        """Add one agreement's terms (0-dim tensors or floats), weighted by its `micro_batches`
        (GradCache: the step's k, as the guard counts it); `skipped`: the guard's agreed flag."""
        for name, value in terms.items():
            value = torch.as_tensor(value, dtype=torch.float64, device=skipped.device).detach().reshape(())
            # where, not a product: a skipped micro-batch's term may be NaN, and 0 x NaN is NaN
            weighted = torch.where(skipped, torch.zeros_like(value), value * micro_batches)
            if name in self._sums:
                self._sums[name] += weighted
            else:
                self._sums[name] = weighted.clone()

    def read(self, good: int) -> dict[str, float]:
        """{name: mean over `good` micro-batches (NaN if none)}, and the next interval starts at 0."""
        if not self._sums:
            return {}
        sums = torch.stack(list(self._sums.values())).tolist()  # one host read for every term
        for total in self._sums.values():
            total.zero_()
        return {name: total / good if good else float("nan") for name, total in zip(self._sums, sums)}

    def state_dict(self) -> dict[str, float]:
        """The interval's sums so far (float64 survives a checkpoint's JSON exactly)."""
        return {name: float(total) for name, total in self._sums.items()}

    def load_state_dict(self, sums: dict, device: torch.device) -> None:
        """Restore `state_dict()`: a run resumed mid-interval logs the uninterrupted run's means."""
        self._sums = {
            name: torch.tensor(float(v), dtype=torch.float64, device=device) for name, v in sums.items()
        }


def _write_marker(marker: str, discarded_path: str) -> None:
    """Record the size of metrics.discarded.jsonl before a split appends to it (written through a
    temporary file and a rename, so a marker that exists is whole)."""
    size = os.path.getsize(discarded_path) if os.path.exists(discarded_path) else None
    with open(marker + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"discarded_size": size}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(marker + ".tmp", marker)


def _finish_interrupted_split(marker: str, tmp: str, discarded_path: str) -> None:
    """Settle a `truncate_after` that a kill interrupted (its marker is still there).

    Its moved rows were appended to metrics.discarded.jsonl before metrics.jsonl was replaced; a kill
    in between left them in both, and the next resume appended them a second time. With the rewrite
    still pending (its temporary file is there), metrics.jsonl is the old one and still holds the
    rows: the append is cut off, and this resume moves them again. Without it, the rename happened
    and the rows are in metrics.discarded.jsonl alone: nothing to undo.
    """
    if not os.path.exists(marker):
        return
    with open(marker, encoding="utf-8") as fh:
        size = json.load(fh)["discarded_size"]
    if os.path.exists(tmp) and os.path.exists(discarded_path):
        if size is None:
            os.remove(discarded_path)
        else:
            with open(discarded_path, "r+b") as fh:
                fh.truncate(size)
        log.warning("metrics.discarded.jsonl: rows of a resume killed mid-way removed; they move again")
    os.remove(marker)


def _split_at_resume(path: str, kept_path: str, discarded_path: str, step: int, eval_owed: bool):
    """Copy the lines `truncate_after` keeps to `kept_path`, append the moved ones to
    `discarded_path` (created only when something moves); returns the `_why_moved` counts."""
    moved: collections.Counter = collections.Counter()
    discarded = None
    try:
        with (
            open(path, encoding="utf-8", errors=_UNDECODABLE) as fh,
            open(kept_path, "w", encoding="utf-8", errors=_UNDECODABLE) as out,
        ):
            for line in fh:
                row = _moved_at_resume(line, step, eval_owed)
                if row is None:
                    if line.strip():
                        out.write(line if line.endswith("\n") else line + "\n")
                    continue
                if discarded is None:
                    discarded = open(discarded_path, "a", encoding="utf-8")
                row = dict(row, discarded_at_resume_from=step)
                discarded.write(json.dumps(row, allow_nan=True) + "\n")
                moved[_why_moved(row, step)] += 1
    finally:
        if discarded is not None:
            discarded.close()
    return moved


def _moved_at_resume(line: str, step: int, eval_owed: bool) -> dict | None:
    """What `truncate_after` moves out for `line` (the row, or {"torn_line": ...}); None for a line
    it keeps, and for a blank one (not moved, and left out of the rewrite)."""
    if not line.strip():
        return None
    row = _parse_row(line)
    if row is None:  # torn, or JSON that is not a row (5, null, [...])
        return {"torn_line": line.rstrip("\n")}
    if row["step"] > step:
        return row
    if eval_owed and row["step"] == step and any(str(key).startswith("eval/") for key in row):
        return row
    return None


def _why_moved(row: dict, step: int) -> str:
    """ "torn", "after" (a row past `step`) or "eval" (eval_owed's eval row at `step`)."""
    if "torn_line" in row:
        return "torn"
    return "after" if row["step"] > step else "eval"


def _what_moved(moved: collections.Counter, step: int) -> str:
    """The warning's account of the moved rows (`_why_moved` counts): a torn line at the end of a
    file that ended at `step` was reported as a row after that step, which the user then looked for
    in vain."""
    parts = [f"{moved['after']} row(s) after step {step}"] if moved["after"] else []
    if moved["eval"]:
        parts.append(f"{moved['eval']} eval row(s) of step {step}, which runs again")
    if moved["torn"]:
        parts.append(f"{moved['torn']} torn line(s) (a kill mid-write, or not a JSON row)")
    return ", ".join(parts)


def _as_json_value(value):
    """A number as a float (bools stay bools). A numpy scalar or a 0-d array or tensor (a loss
    term logged as it came) made json.dumps raise: the row, and the run, were lost."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def read_metrics(run_dir: str) -> list[dict]:
    """Rows of RUN/metrics.jsonl: JSON objects with a step. A line torn by a kill mid-write, or
    JSON that is not a row (``5``, ``null``, a list: a hand-edited file), is left out with one
    warning that counts them, as ``truncate_after`` treats them; callers read ``row["step"]``.
    Holds every row: a reader that needs a few keys iterates ``iter_metrics`` instead."""
    return list(iter_metrics(run_dir))


def iter_metrics(run_dir: str):
    """The rows of ``read_metrics`` one at a time, with its warning once the file is read. All rows
    of a long run at once (10^6 rows: ~3 GB of dicts) were held by curves.png and the final-eval
    lookup at the end of the run, on rank 0 beside the model."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    skipped = 0
    with open(path, encoding="utf-8", errors=_UNDECODABLE) as fh:
        for line in fh:
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is None:
                skipped += 1
            else:
                yield row
    if skipped:
        log.warning(
            "%s: %d line(s) skipped (torn by a kill, or not a JSON object with a step)", path, skipped
        )


def _parse_row(line: str) -> dict | None:
    """The row a metrics.jsonl line holds, its step an int, or None for a torn line or JSON that is
    not a row. A step written as a string ("4", a hand-edited or foreign row) or as 4.0 counts as
    step 4: it was read as it came and never matched an int step (logged_eval), and curves.png
    drew it on a text axis. A step that is no whole number (4.5, true, "x") is not a row."""
    try:
        row = json.loads(line)
        row["step"] = _whole_step(row["step"])
    except (ValueError, KeyError, TypeError, IndexError, OverflowError):  # OverflowError: a step of 1e999
        return None
    return row


def _whole_step(step) -> int:
    """`step` as an int; ValueError unless it is a whole number (or a string of one)."""
    if isinstance(step, bool):
        raise ValueError("a bool is not a step")
    if isinstance(step, str):
        step = float(step.strip())
    if not isinstance(step, numbers.Real) or step != int(step):
        raise ValueError(f"not a whole step: {step!r}")
    return int(step)


def logged_eval(run_dir: str, step: int) -> dict:
    """The eval metrics RUN/metrics.jsonl holds for `step` ({} if none): what a finished run's
    final eval returned, for a rerun that finds nothing left to train."""
    found: dict = {}
    for row in iter_metrics(run_dir):
        if row["step"] == step:
            found.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return found
