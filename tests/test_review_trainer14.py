"""A resume whose file work on rank 0 fails stops every rank with rank 0's one line (2 gloo ranks,
the real Trainer, real files).

After the ranks have loaded a checkpoint, rank 0 alone moves a roll-back's later checkpoints aside
(`checkpoint.set_aside_later`) and moves metrics.jsonl's rows past the step out. Either could raise
on rank 0 only (a full disk, a permission error); the other ranks then went on into training and
waited in its first collective for a partner that had stopped (on NCCL, the group's 30 minutes).
Here the failures are real ones that no user, root included, can get past: a dangling link where
the set-aside folder must be made, a folder where metrics.jsonl's rewrite must be written.
"""

from __future__ import annotations

import os
import time

import pytest

from helpers_dist import run_distributed

# The set-aside folder is named after the UTC second it is made in: a link for each second of this
# window (far longer than a Trainer takes to build on a loaded machine) is where it will be made.
_ASIDE_WINDOW_S = 1800


def _trainer(run_dir: str, shards: dict, steps: int, **extra):
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    from inprocess_trainer import overrides

    fields = dict(train__checkpoint_every=2, eval__every=0, data__val_shards="", **extra)
    return Trainer(load_config("tiny", overrides(shards, run_dir, steps, **fields)), resolve_dist_env())


def _start(run_dir: str, shards: dict, **extra) -> dict:
    """This rank's resumed Trainer on ``run_dir``: the step it resumed at, or what stopped it."""
    try:
        trainer = _trainer(run_dir, shards, 4, **extra)
    except Exception as exc:  # recorded, not raised: the test compares what each rank said
        return {"error": f"{type(exc).__name__}: {exc}"}
    trainer.release_run_dir()
    return {"error": None, "step": trainer.step}


def _block_set_aside(run_dir: str) -> None:
    """A dangling link at every name the set-aside folder can take for the next half hour: not
    taken as used (nothing is there), yet `os.makedirs` cannot make the folder (File exists)."""
    now = time.time()
    for second in range(-5, _ASIDE_WINDOW_S):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + second))
        os.symlink(os.path.join(run_dir, "gone"), os.path.join(run_dir, f"checkpoints.replaced-{stamp}"))


def _failing_resumes(rank: int, world: int, shards: dict, root: str) -> dict:
    """Train 4 steps (checkpoints at 2 and 4), then two resumes whose file work fails on rank 0."""
    import torch.distributed as dist

    run_dir = os.path.join(root, "run")
    trainer = _trainer(run_dir, shards, 4)
    trainer.train()
    if rank == 0:
        _block_set_aside(run_dir)
    dist.barrier()
    rollback = _start(run_dir, shards, train__resume=os.path.join(run_dir, "checkpoints", "step_00000002"))
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "metrics.jsonl.tmp"))  # where the kept rows must be written
    dist.barrier()
    return {"rollback": rollback, "auto": _start(run_dir, shards)}


@pytest.fixture(scope="module")
def outcomes(tiny_shards, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer14"))
    # A collective that loses its peer fails within 60 s instead of hanging the test.
    return root, run_distributed(_failing_resumes, 2, tiny_shards, root, timeout_s=60)


def _same_line_on_every_rank(ranks: list[dict], case: str) -> str:
    errors = [r[case]["error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "\n" not in errors[0]
    return errors[0]


def test_a_roll_back_whose_set_aside_fails_on_rank_0_stops_every_rank_with_its_line(outcomes):
    """Before, rank 0 raised FileExistsError alone and rank 1 went into training's first collective:
    a gloo error about a closed peer here, a 30-minute wait on NCCL."""
    root, ranks = outcomes
    line = _same_line_on_every_rank(ranks, "rollback")
    assert line.startswith("CheckpointError: rank 0 could not put the run's files in order after ")
    assert "resuming at step 2" in line and "FileExistsError" in line
    assert os.path.join(root, "run", "checkpoints.replaced-") in line  # the path it could not make


def test_an_auto_resume_whose_metrics_rewrite_fails_on_rank_0_stops_every_rank_with_its_line(outcomes):
    """The set-aside above failed before moving anything, so this resume takes step 4 again."""
    root, ranks = outcomes
    line = _same_line_on_every_rank(ranks, "auto")
    assert "resuming at step 4" in line and "IsADirectoryError" in line
    assert os.path.join(root, "run", "metrics.jsonl.tmp") in line
