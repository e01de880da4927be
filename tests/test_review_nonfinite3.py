"""A step the non-finite guard skipped logs `train/grad_norm` and `train/grad_norm_max` as inf on
both of its zeroing paths.

- Through the real Trainer in this process (tiny preset, world 1 on gloo, a NaN loss injected at
  step 2 as tests/test_review_nonfinite.py does): bf16 ZeRO-1 with one micro-batch per step (the
  step-time mask, grad_clip.mask_at_step: DeepSpeed reports -1) and with two (the guard's
  per-parameter hooks: the gradients are zeros, the norm 0) log the same rows: inf at step 2 in
  both columns, finite norms at steps 1 and 3; over a 3-step interval grad_norm_max is inf too.
  Before: the hooks path logged 0 at step 2, and the interval's maximum hid the skip.
  The trainer passes the guard's flag (NonFiniteGuard.step_skipped) to IntervalNormMax.add and
  reads train/grad_norm through grad_norm.logged_step_norm.
- NonFiniteGuard.step_skipped is set only when every micro-batch of the last step was skipped
  (a step with a good micro-batch stepped with its gradient: its norm is real).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_review_nonfinite import _poison
from training_rows import training_rows

PATHS = {
    "mask_at_step": dict(train__grad_accum_steps=1, train__micro_batch_size=16),
    "hooks": dict(train__grad_accum_steps=2, train__micro_batch_size=8, train__accumulation="plain"),
}


def _norms(tiny_shards, run_dir, path: str, log_every: int) -> list[tuple]:
    hooks = []
    rows = training_rows(
        tiny_shards,
        run_dir,
        3,
        on_trainer=lambda t: (hooks.append(bool(t.guard._hooks)), _poison(nan_loss_steps={2})(t)),
        train__precision="bf16",
        train__zero_stage=1,
        train__grad_clip=1.0,
        train__warmup_steps=0,
        train__log_every=log_every,
        **PATHS[path],
    )
    assert hooks == [path == "hooks"], "the run did not take the path it is named after"
    columns = ("step", "train/grad_norm", "train/grad_norm_max", "train/nonfinite_skipped")
    return [tuple(r[c] for c in columns) for r in rows]


def test_both_zeroing_paths_log_a_skipped_step_as_inf(tiny_shards, tmp_path, single_process):
    rows = {p: _norms(tiny_shards, str(tmp_path / p), p, log_every=1) for p in PATHS}
    for path, logged in rows.items():
        assert [r[0] for r in logged] == [1, 2, 3], path
        assert logged[1][1:3] == (math.inf, math.inf), (path, logged)
        good = (logged[0], logged[2])
        assert all(math.isfinite(r[1]) and math.isfinite(r[2]) for r in good), (path, logged)
    skipped = {p: [r[3] for r in logged] for p, logged in rows.items()}
    assert skipped == {"mask_at_step": [0, 1, 0], "hooks": [0, 2, 0]}


def test_the_hooks_path_interval_max_shows_the_skipped_step(tiny_shards, tmp_path, single_process):
    (row,) = _norms(tiny_shards, str(tmp_path / "run"), "hooks", log_every=3)
    assert row[0] == 3 and row[2] == math.inf and math.isfinite(row[1]), row


@pytest.mark.parametrize(
    ("losses", "skipped"),
    [(["nan", "nan"], True), (["nan", 1.0], False), ([1.0, "nan"], False), ([1.0, 1.0], False)],
)
def test_step_skipped_needs_every_micro_batch_of_the_step(losses, skipped):
    from vutrain.grad_norm import IntervalNormMax, logged_step_norm
    from vutrain.nonfinite import NonFiniteGuard

    cpu = torch.device("cpu")
    guard = NonFiniteGuard(torch.nn.Linear(2, 2), cpu, world_size=1)
    guard.agree(torch.tensor(float("nan")))  # a skipped step before: the streak must not leak in
    for loss in losses:
        guard.agree(torch.tensor(float(loss)))
    flag = guard.step_skipped(2)
    assert bool(flag) is skipped
    norm_max = IntervalNormMax()
    norm_max.add(torch.tensor(0.0), cpu, flag)
    assert norm_max.read() == (math.inf if skipped else 0.0)
    assert logged_step_norm(0.25, cpu, flag) == (math.inf if skipped else 0.25)
    assert logged_step_norm(-1.0, cpu, flag) == math.inf and logged_step_norm(None, cpu, flag) is None
