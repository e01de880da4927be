"""Today's per-step additions to the training loop, checked for what only a GPU would show.

- Between two optimizer steps of a non-logging step, the loop (``Trainer._train``: the interval's
  norm maximum with the guard's skipped flag, ``_step_skipped``, the stop check, the interval's
  wall time, the eval/checkpoint tests) reads no tensor value on the host: every such read is a
  device sync per step on a GPU. Counted with ``vutrain.host_reads.HostReads`` over a real tiny
  Trainer in this process, on both zeroing paths (bf16 ZeRO-1's step-time mask, where DeepSpeed
  reports -1 on the device; GradCache with two micro-batches, which also runs the locked-tower
  check at every step), with a NaN loss at step 2 so that a skipped step goes through it.
  test_train_step.py counts ``train_step`` itself; nothing counted the loop around it.
- ``grad_norm.step_norm`` and ``NonFiniteGuard.step_skipped`` produce their tensors on the norm's
  device whatever the norm arrived as (a host float, a CPU tensor, a bf16 [1] tensor, a flag from
  another device): a ``meta`` device stands in for the GPU.

No bug found: these pin the step's lean path. Expected runtime: ~25 s.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_review_nonfinite import _poison
from training_rows import training_rows

from vutrain.host_reads import HostReads

STEPS = 4
PATHS = {
    "mask_at_step": dict(
        train__precision="bf16", train__zero_stage=1, train__grad_accum_steps=1, train__grad_clip=1.0
    ),
    "gradcache": dict(train__accumulation="gradcache", train__grad_accum_steps=2, train__micro_batch_size=8),
}


class BetweenSteps:
    """on_trainer hook: count `reads` from each `train_step`'s return to the loop's next
    `train_step` or logging read (`read_stats`): what the loop adds to every step. `windows`: the
    steps whose window opened.

    The stop check's lagged read is left out: it reads the previous step's values from a pinned
    host buffer after that step's event (StopCheck), by design not a wait on the current step."""

    def __init__(self, reads: HostReads):
        self.reads, self.windows, self._open = reads, [], False

    def close(self) -> None:
        if self._open:
            self._open = False
            self.reads.__exit__(None, None, None)

    def __call__(self, trainer) -> None:
        inner_step, inner_stats = trainer.train_step, trainer.read_stats
        inner_check = trainer.stop_check.check

        def train_step(*args, **kwargs):
            self.close()
            out = inner_step(*args, **kwargs)
            self.windows.append(trainer.step + 1)
            self.reads.__enter__()
            self._open = True
            return out

        def read_stats(*args, **kwargs):
            self.close()
            return inner_stats(*args, **kwargs)

        def check(now: bool = False):
            if now:
                return inner_check(now=now)
            with self.reads.paused():
                return inner_check(now=now)

        trainer.train_step, trainer.read_stats, trainer.stop_check.check = train_step, read_stats, check


@pytest.mark.parametrize("path", list(PATHS))
def test_the_loop_reads_nothing_between_two_steps(tiny_shards, tmp_path, single_process, path):
    reads, poison = HostReads(None), _poison(nan_loss_steps={2})
    between = BetweenSteps(reads)
    try:
        rows = training_rows(
            tiny_shards,
            str(tmp_path / "run"),
            STEPS,
            on_trainer=lambda t: (poison(t), between(t)),
            train__log_every=STEPS,
            train__warmup_steps=0,
            **PATHS[path],
        )
    finally:
        between.close()  # a run that raised inside a window leaves no mode behind
    assert between.windows == list(range(1, STEPS + 1)), between.windows
    assert dict(reads.sites) == {}, f"host reads per step outside train_step: {dict(reads.sites)}"
    (row,) = rows  # the skipped step went through the counted path and reached the interval's max
    assert row["train/nonfinite_skipped"] > 0 and row["train/grad_norm_max"] == math.inf, row


META = torch.device("meta")


def test_a_steps_norm_and_skipped_flag_stay_on_the_norms_device():
    from vutrain.grad_norm import IntervalNormMax, step_norm
    from vutrain.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(torch.nn.Linear(2, 2, device=META), META, world_size=1)
    skipped = guard.step_skipped(2)
    assert (skipped.device, skipped.dtype, skipped.shape) == (META, torch.bool, ())
    bf16_one = torch.tensor([3.0], dtype=torch.bfloat16)
    norms = [3.0, -1.0, torch.tensor(3.0), bf16_one, torch.tensor(3.0, device=META)]
    for norm in norms:
        for flag in (skipped, torch.tensor(True), None):  # a CPU flag is moved, not mixed in
            value = step_norm(norm, META, flag)
            assert (value.device, value.dtype, value.shape) == (META, torch.float64, ()), (norm, flag)
    norm_max = IntervalNormMax()
    for norm in norms:
        norm_max.add(norm, META, skipped)
    assert norm_max._max.device == META
