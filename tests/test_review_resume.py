"""Exact resume, end to end: a run pre-empted (and crashed) and resumed ends as the run never
interrupted: the same weights, Adam moments and step, LR, metrics rows and samples in the same order.

A world-1 Trainer in this process (tests/inprocess_trainer.py); real SIGUSR1 signals, real
DeepSpeed checkpoints, the stream's own sample log (VUTRAIN_SAMPLE_LOG) for the data order.
"""

from __future__ import annotations

import glob
import os
import types

import torch
from run_rows import TIMING_KEYS, metrics_rows
from step_signals import before_steps, send_preemption_warning

from inprocess_trainer import train


class Crash(BaseException):
    """A crash between two steps (after the last checkpoint): not an Exception the trainer handles."""


def _nonfinite_at(trainer, nan_loss_steps: set, inf_grad_steps: set) -> None:
    """A NaN loss in `nan_loss_steps` (the guard skips it), an inf gradient from a finite loss in
    `inf_grad_steps` (DeepSpeed skips the optimizer step): keyed by the step, so that both runs
    see them at the same steps."""
    inner = trainer.loss_fn
    forward = inner.forward

    def poisoned(*args, **kwargs):
        loss = forward(*args, **kwargs)
        return loss * float("nan") if trainer.step + 1 in nan_loss_steps else loss

    inner.forward = poisoned
    param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
    param.register_hook(
        lambda g: torch.full_like(g, float("inf")) if trainer.step + 1 in inf_grad_steps else g
    )


def _final_state(trainer) -> dict:
    engine = trainer.engine
    state = {f"w.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for i, slots in enumerate(base.state.values()):
        for name, value in slots.items():
            state[f"opt.{i}.{name}"] = value.detach().clone() if torch.is_tensor(value) else value
    state["lr"] = engine.get_lr()
    state["overflow_skipped"] = engine.skipped_steps
    state["skipped_samples"] = trainer.stream.skipped()
    return state


def _samples(prefix: str) -> list[str]:
    keys = []
    for path in sorted(glob.glob(prefix + ".*")):
        with open(path, encoding="utf-8") as fh:
            keys += fh.read().split()
    return keys


def _run(shards, run_dir, steps, stops=(), crash_before=None, hooks=(), **extra):
    """Train `steps`, with SIGUSR1 before each step of `stops` and one crash before `crash_before`,
    resuming (train.resume=auto) after each; returns (the last trainer's final state, sample keys,
    the steps it was pre-empted at)."""
    from vutrain.trainer import Preempted

    last, preempted, crashed = {}, [], []
    os.environ["VUTRAIN_SAMPLE_LOG"] = run_dir + ".samples"

    def before_step(trainer):
        number = trainer.step + 1
        if number in stops:
            send_preemption_warning()
        if number == crash_before and not crashed:
            crashed.append(number)
            raise Crash

    def on_trainer(trainer):
        last["trainer"] = trainer
        before_steps(trainer, None, before_step)  # every step: `stops` and the crash
        for hook in hooks:
            hook(trainer)

    for _ in range(len(stops) + 2):
        try:
            train(shards, run_dir, steps, on_trainer=on_trainer, **extra)
            break
        except Preempted as exc:
            preempted.append(exc.step)
        except Crash:
            pass
    else:
        raise AssertionError(f"the run did not finish: pre-empted at {preempted}")
    return _final_state(last["trainer"]), _samples(run_dir + ".samples"), preempted


def _assert_same_state(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.equal(value.nan_to_num(7.0), got[key].nan_to_num(7.0)), key
        else:
            assert value == got[key], key


def test_preempted_twice_and_crashed_resumes_bit_for_bit(tiny_shards, tmp_path, single_process):
    """ZeRO-1, train.accumulation=gradcache with 2 micro-batches (8 steps an epoch), log_every 4,
    checkpoints every 2 steps, NaN losses at steps 6-7 and an overflowing gradient at step 9:
    pre-empted at step 6 (mid streak, mid logging interval) and at step 8 (the epoch's end), and
    killed before step 10 (step 9's work is lost and redone). Every weight, Adam moment and
    step, the LR, the overflow and skip counters, every metrics row (timings aside) and the
    samples of the kept steps are the uninterrupted run's."""
    extra = dict(
        train__zero_stage=1,
        train__accumulation="gradcache",
        train__grad_accum_steps=2,
        train__log_every=4,
        train__checkpoint_every=2,
        eval__every=4,
    )

    def poison(trainer):
        _nonfinite_at(trainer, {6, 7}, {9})

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    want, want_keys, _ = _run(tiny_shards, full, 11, hooks=[poison], **extra)
    got, got_keys, preempted = _run(
        tiny_shards, split, 11, stops={5, 8}, crash_before=10, hooks=[poison], **extra
    )
    assert preempted == [6, 8]
    _assert_same_state(want, got)
    assert metrics_rows(split, TIMING_KEYS) == metrics_rows(full, TIMING_KEYS)
    per_step = 16 * 2
    # The crash lost step 9 (after the checkpoint at 8): its samples were drawn twice, the same.
    lost = got_keys[8 * per_step : 9 * per_step]
    assert lost == got_keys[9 * per_step : 10 * per_step]
    assert got_keys[: 8 * per_step] + got_keys[9 * per_step :] == want_keys
    rows = {r["step"]: r for r in metrics_rows(full, TIMING_KEYS) if "train/loss" in r}
    # Steps 6-7 skipped, 2 micro-batches each: counted as micro-batches, as plain accumulation does.
    assert rows[8]["train/nonfinite_skipped"] == 4 and rows[11]["train/overflow_skipped_steps"] == 1


def _step_dependent_clock(monkeypatch, trainer_of) -> None:
    """The trainer's perf_counter advances by 1 + the step number per call: a step's wall time is
    known and differs from step to step, so a mean over other steps shows."""
    import time as real_time

    import vutrain.trainer as trainer_module

    now = [0.0]

    def perf_counter():
        trainer = trainer_of.get("trainer")
        now[0] += 1.0 + (trainer.step if trainer is not None else 0)
        return now[0]

    clock = types.SimpleNamespace(
        **{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")}
    )
    clock.perf_counter = perf_counter
    monkeypatch.setattr(trainer_module, "time", clock)


def test_a_split_logging_interval_logs_the_step_time_of_all_its_steps(
    tiny_shards, tmp_path, single_process, monkeypatch
):
    """log_every=4, pre-empted at step 2: the row at step 4 gives train/step_time (and samples/s)
    as the mean over steps 1-4, as without the pre-emption; it averaged steps 3-4 only (the
    interval's wall time was not in the checkpoint). The trainer's clock is made deterministic."""
    seen: dict = {}
    _step_dependent_clock(monkeypatch, seen)
    extra = dict(train__log_every=4, eval__every=0, data__val_shards="")

    def remember(trainer):
        seen["trainer"] = trainer

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    _run(tiny_shards, full, 4, hooks=[remember], **extra)
    _, _, preempted = _run(tiny_shards, split, 4, stops={2}, hooks=[remember], **extra)
    assert preempted == [2]
    timing = {"train/step_time", "train/samples_per_s"}

    def timings(run_dir):
        return [{k: v for k, v in r.items() if k in timing | {"step"}} for r in metrics_rows(run_dir)]

    assert timings(split) == timings(full)
    assert [r["step"] for r in timings(full)] == [4]
