"""Review of the training loop's metrics and end-of-run bookkeeping (world-1 Trainer in this process)."""

from __future__ import annotations

import os
import signal

import pytest
from step_signals import before_steps, signal_before_step

from inprocess_trainer import train


def test_stop_in_the_last_step_after_its_eval_logs_that_eval_once(tiny_shards, tmp_path, single_process):
    """SIGUSR1 during the last step, an eval step, with train.log_every > 1: the stop is first read
    after the loop, where the last step's eval had already run. The run was pre-empted with that
    eval marked as owed, and the requeued job ran it again: two eval rows for the last step. Now
    the last step logs, so its check reads the stop before its eval, as on any logging step."""
    from vutrain.metrics import read_metrics
    from vutrain.trainer import Preempted

    run_dir = str(tmp_path / "run")
    kept = dict(train__log_every=100, train__checkpoint_every=0, eval__every=2)

    def hook(trainer):
        signal_before_step(trainer, 4)

    with pytest.raises(Preempted):
        train(tiny_shards, run_dir, steps=4, on_trainer=hook, **kept)
    train(tiny_shards, run_dir, steps=4, **kept)  # the requeued job
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    assert [row["step"] for row in read_metrics(run_dir) if "eval/i2t_r1" in row] == [2, 4]


def test_a_continued_finished_run_preempted_at_its_last_step_finishes_when_requeued(
    tiny_shards, tmp_path, single_process
):
    """A finished run (its final checkpoint says so) continued with a larger train.max_steps and
    pre-empted at the new last step: the pre-emption checkpoint still said "finished", so the
    requeued job took the run for done: no eval of the last step, and no done.json."""
    from vutrain.metrics import read_metrics
    from vutrain.trainer import Preempted

    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=0, eval__every=2)
    train(tiny_shards, run_dir, steps=2, **kept)

    def hook(trainer):
        signal_before_step(trainer, 4)

    with pytest.raises(Preempted) as raised:
        train(tiny_shards, run_dir, steps=4, on_trainer=hook, **kept)
    assert raised.value.step == 4
    metrics = train(tiny_shards, run_dir, steps=4, **kept)  # the requeued job: step 4's eval
    assert "eval/i2t_r1" in metrics
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    assert [row["step"] for row in read_metrics(run_dir) if "eval/i2t_r1" in row] == [2, 4]


def test_the_last_partial_logging_interval_is_logged(tiny_shards, tmp_path, single_process, caplog):
    """train.max_steps=5 with train.log_every=2: step 5's interval was never written (rows at 2
    and 4 only), so a non-finite loss skipped there showed in no metric and no warning."""
    import logging

    import torch

    from vutrain.metrics import read_metrics

    run_dir = str(tmp_path / "run")

    def nan_loss(trainer):
        inner = trainer.loss_fn.forward
        trainer.loss_fn.forward = lambda *a, **k: inner(*a, **k) * torch.tensor(float("nan"))

    def hook(trainer):
        before_steps(trainer, 5, nan_loss)

    with caplog.at_level(logging.WARNING, logger="vutrain"):
        train(
            tiny_shards,
            run_dir,
            steps=5,
            on_trainer=hook,
            train__log_every=2,
            train__checkpoint_every=0,
            eval__every=0,
            data__val_shards="",
        )
    rows = [row for row in read_metrics(run_dir) if "train/loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert [row["train/nonfinite_skipped"] for row in rows] == [0, 0, 1]
    assert any("non-finite loss" in r.getMessage() and "step 5" in r.getMessage() for r in caplog.records)


class _Crash(Exception):
    pass


def _crash(trainer) -> None:
    raise _Crash


def test_a_crash_after_the_owed_eval_does_not_log_it_twice(tiny_shards, tmp_path, single_process):
    """Pre-empted at step 2 before its eval (owed, in the checkpoint); the requeued job runs that
    eval, then dies before its next checkpoint. The next job resumes from step 2 again, still owing
    the eval: the row the dead job wrote for it was kept, and a second one was logged beside it."""
    from vutrain.metrics import read_metrics
    from vutrain.trainer import Preempted

    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=2, eval__every=2)

    def signal_before_2(trainer):
        signal_before_step(trainer, 2)

    def crash_before_3(trainer):
        before_steps(trainer, 3, _crash)

    with pytest.raises(Preempted):
        train(tiny_shards, run_dir, steps=4, on_trainer=signal_before_2, **kept)
    with pytest.raises(_Crash):
        train(tiny_shards, run_dir, steps=4, on_trainer=crash_before_3, **kept)
    train(tiny_shards, run_dir, steps=4, **kept)
    assert [row["step"] for row in read_metrics(run_dir) if "eval/i2t_r1" in row] == [2, 4]


def test_rerunning_a_finished_run_keeps_its_done_marker(tiny_shards, tmp_path, single_process):
    """The same command again over a finished run: the start cleared done.json (last run's end
    markers) and the rerun, finding nothing to train, never wrote it back."""
    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=0, eval__every=0, data__val_shards="")
    train(tiny_shards, run_dir, steps=2, **kept)
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    train(tiny_shards, run_dir, steps=2, **kept)
    assert os.path.exists(os.path.join(run_dir, "done.json"))


def _tokenizer_json(run_dir: str) -> str:
    with open(os.path.join(run_dir, "tokenizer", "tokenizer.json"), encoding="utf-8") as fh:
        return fh.read()


def test_a_fresh_start_trains_its_own_tokenizer(tiny_shards, tmp_path, single_process):
    """train.resume=never over a used run directory with another model.vocab_size: the previous
    run's preset tokenizer was reused without a word (the new model sized by it, not by the key).
    It is now moved aside with the old checkpoints and metrics, and trained again."""
    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=0, eval__every=0, data__val_shards="")  # no final eval: ~1 s each
    train(tiny_shards, run_dir, steps=1, model__vocab_size=300, **kept)
    first = _tokenizer_json(run_dir)
    train(tiny_shards, run_dir, steps=1, model__vocab_size=400, train__resume="never", **kept)
    assert _tokenizer_json(run_dir) != first
    aside = [name for name in os.listdir(run_dir) if name.startswith("tokenizer.replaced-")]
    assert len(aside) == 1, os.listdir(run_dir)
    with open(os.path.join(run_dir, aside[0], "tokenizer.json"), encoding="utf-8") as fh:
        assert fh.read() == first


def test_a_run_resumed_from_another_runs_checkpoint_takes_its_tokenizer(
    tiny_shards, tmp_path, single_process
):
    """train.resume=<another run's checkpoint> into a new output_dir: the new run trained its own
    preset tokenizer on its own settings (here fewer `data.tokenizer_samples`), so the checkpoint's
    embeddings met other token ids (or another vocabulary size: a shape error). It now copies the
    checkpoint's run's tokenizer."""
    first_dir, second_dir = str(tmp_path / "a"), str(tmp_path / "b")
    no_eval = dict(eval__every=0, data__val_shards="")  # no final eval: ~1 s each
    train(tiny_shards, first_dir, steps=2, train__checkpoint_every=2, **no_eval)
    train(
        tiny_shards,
        second_dir,
        steps=3,
        train__resume=os.path.join(first_dir, "checkpoints"),
        data__tokenizer_samples=40,
        train__checkpoint_every=0,
        **no_eval,
    )
    assert _tokenizer_json(second_dir) == _tokenizer_json(first_dir)


def test_two_fresh_starts_within_a_second_keep_both_previous_runs(tmp_path):
    """move_aside named the folder by the second: the benchmarks, which build a Trainer per
    configuration in one run directory with train.resume=never, failed on the second within the
    same second ("OSError: Directory not empty") once the tokenizer moved aside too."""
    from vutrain.checkpoint import move_aside

    run_dir = tmp_path / "run"
    for content in ("first", "second"):
        (run_dir / "tokenizer").mkdir(parents=True)
        (run_dir / "tokenizer" / "tokenizer.json").write_text(content)
        move_aside(str(run_dir))
    kept = sorted(p.read_text() for p in run_dir.glob("tokenizer.replaced-*/tokenizer.json"))
    assert kept == ["first", "second"]


def _signal_during_eval(trainer, step: int) -> None:
    """Send SIGUSR1 while the eval of `step` reads its first validation sample (a real signal,
    at a point of the eval that a test can hit every time)."""
    preprocess = trainer.evaluator.preprocess

    def wrapped(*args, **kwargs):
        if trainer.step == step and not trainer._signal:
            os.kill(os.getpid(), signal.SIGUSR1)
        return preprocess(*args, **kwargs)

    trainer.evaluator.preprocess = wrapped


@pytest.mark.parametrize("steps,eval_step", [(3, 3), (4, 2)], ids=["final-eval", "periodic-eval"])
def test_a_signal_during_an_eval_preempts_before_the_next_step(
    tiny_shards, tmp_path, single_process, steps, eval_step
):
    """SIGUSR1 during an eval was acted on only at the next step: an eval longer than SLURM's
    warning ran into the kill (the final eval has no next step: the job was killed without a
    checkpoint since the last periodic one, and not requeued). Now the eval stops between two
    batches, the step's checkpoint owes it, and the requeued job runs it first; a signal during
    that owed eval pre-empts again without writing the checkpoint twice. Each eval is logged once."""
    from vutrain import checkpoint as ckpt
    from vutrain.metrics import read_metrics
    from vutrain.trainer import Preempted

    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=2, eval__every=2, eval__batch_size=8)
    with pytest.raises(Preempted):
        train(
            tiny_shards, run_dir, steps=steps, on_trainer=lambda t: _signal_during_eval(t, eval_step), **kept
        )
    assert ckpt.latest_tag(ckpt.checkpoints_dir(run_dir)) == f"step_{eval_step:08d}"
    assert not os.path.exists(os.path.join(run_dir, "done.json"))
    assert not [row for row in read_metrics(run_dir) if row["step"] == eval_step and "eval/i2t_r1" in row]
    with pytest.raises(Preempted):  # again, in the owed eval the requeued job runs first
        train(
            tiny_shards, run_dir, steps=steps, on_trainer=lambda t: _signal_during_eval(t, eval_step), **kept
        )
    train(tiny_shards, run_dir, steps=steps, **kept)
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    evals = [row["step"] for row in read_metrics(run_dir) if "eval/i2t_r1" in row]
    assert evals == sorted(set(evals)) and eval_step in evals and steps in evals


def test_a_resume_past_a_lowered_max_steps_says_that_nothing_is_trained(
    tiny_shards, tmp_path, single_process, caplog
):
    """An unfinished checkpoint at step 2 resumed with train.max_steps=1 ended the run at step 2
    (done.json 2, past the limit) without a word."""
    import shutil

    run_dir = str(tmp_path / "run")
    kept = dict(train__checkpoint_every=2, eval__every=0, data__val_shards="")
    train(tiny_shards, run_dir, steps=4, **kept)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_00000004"))  # step 2 is unfinished
    with caplog.at_level("WARNING", logger="vutrain"):
        train(tiny_shards, run_dir, steps=1, **kept)
    assert "resumed at step 2, past train.max_steps=1: no step is trained" in caplog.text
