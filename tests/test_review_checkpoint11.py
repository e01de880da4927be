"""What each rank says when a checkpoint save stops on another rank (2 gloo ranks, real DeepSpeed
engines): the message must say whether the checkpoint is complete and which one the next
train.resume=auto takes, and that start must take it.

Before, a rank 0 that stopped after the marker said nothing true on the other rank: "checkpoint
step_X was not completed ... continues from step_X" (stopped after `latest` was written), or
"... continues from" the previous checkpoint although the next start publishes step_X and
continues from it (stopped between the marker and the rename).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import traceback
from datetime import timedelta

import pytest
import torch
from tiny_modules import TwoLayer

from helpers_dist import run_distributed

STEP1, STEP2 = "step_00000001", "step_00000002"
CASES = ("after_complete", "publish_fails", "before_marker")


class _Stopped(Exception):
    """Rank 0 going away at a chosen point of its save (its group closes, as a killed rank's does)."""


def _engine():
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    torch.manual_seed(0)
    module = TwoLayer()
    cfg = TrainConfig(max_steps=10, micro_batch_size=2, zero_stage=1, warmup_steps=2, lr=1e-2)
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_ds_config(cfg, torch.distributed.get_world_size()),
    )
    return engine


def _stop_rank0_at(ckpt, where: str) -> None:
    """Rank 0 stops in its second save: after `_complete` ("after_complete"), with the rename of
    the marked .tmp failing ("publish_fails", an OSError), or before the marker ("before_marker")."""
    complete, publish = ckpt._complete, ckpt._publish

    def after_complete(*args):
        complete(*args)
        raise _Stopped(where)

    def before_marker(*args):
        raise _Stopped(where)

    def publish_fails(*args):
        raise OSError(16, "Device or resource busy")

    if where == "after_complete":
        ckpt._complete = after_complete
    elif where == "before_marker":
        ckpt._complete = before_marker
    else:
        ckpt._publish = publish_fails
    return complete, publish


def _one_case(rank, world, run_dir, where):
    """Save step 1, then step 2 with
    rank 0 stopping at `where`; returns this rank's message and what train.resume=auto then takes."""
    import deepspeed
    import torch.distributed as dist

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo", timeout=timedelta(seconds=60))  # a lost peer fails, not hangs
    engine = _engine()
    ckpt.save_checkpoint(engine, run_dir, 1, {"step": 1, "data": {}}, rank, keep=2)
    saved = _stop_rank0_at(ckpt, where) if rank == 0 else None
    try:
        ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=2)
        said = "saved"
    except _Stopped:
        said = "stopped"
    except ckpt.CheckpointWriteError as exc:
        said = str(exc)
    finally:
        if saved is not None:
            ckpt._complete, ckpt._publish = saved
        dist.destroy_process_group()
    # The next start: rank 0 publishes a marked .tmp, then every rank resolves. The group is gone,
    # so rank 1 waits on a file for rank 0's publish (it resolved first once in CI: step_1).
    published = f"{run_dir}.next_start_published"
    if rank == 0:
        ckpt.finish_interrupted_publish(ckpt.checkpoints_dir(run_dir))
        open(published, "w").close()
    else:
        deadline = time.monotonic() + 60
        while not os.path.exists(published) and time.monotonic() < deadline:
            time.sleep(0.05)
    resumed = ckpt.resolve_resume("auto", run_dir, verbose=False)
    return said, resumed[1] if resumed else None


def _cases_in_forks(rank, world, root, ports):
    """{case: (message, resumed tag)} of this rank: each case in a child forked from this rank, on
    its own port, so each has a fresh process and group as a spawn per case gave (a failed group is
    closed for good; a second group in the same process hung), without importing torch, DeepSpeed
    and Dynamo again in each (about 5 s of CPU per process)."""
    import deepspeed  # noqa: F401
    import torch._dynamo  # noqa: F401  (DeepSpeed's optimizer check imports it at initialize)

    from vutrain.distributed import shm_buffer_path

    results = {}
    for where, port in zip(CASES, ports):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the case, send its result, leave without the parent's teardown
            os.close(read)
            code = 1
            try:
                os.environ["MASTER_PORT"] = str(port)
                result = _one_case(rank, world, os.path.join(root, where), where)
                with os.fdopen(write, "wb") as fh:
                    pickle.dump(result, fh)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            sent = fh.read()
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(FileNotFoundError):  # DeepSpeed's CPU all-reduce segment, if any
            os.unlink(shm_buffer_path(rank, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
        assert status == 0 and sent, f"rank {rank}, case {where}: the child failed (status {status})"
        results[where] = pickle.loads(sent)
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case: [rank 0's, rank 1's (message, resumed tag)]}: one pair of spawned ranks, one process
    group per case, each in a forked child of the ranks."""
    from worker_ports import free_port

    root = str(tmp_path_factory.mktemp("ckpt11"))
    ports: list[int] = []
    while len(ports) < len(CASES):
        port = free_port()
        if port not in ports:
            ports.append(port)
    by_rank = run_distributed(_cases_in_forks, 2, root, ports, init_process_group=False, timeout_s=60)
    return {where: [rank[where] for rank in by_rank] for where in CASES}


@pytest.mark.slow
def test_a_rank_that_stops_after_the_marker_is_reported_as_a_complete_checkpoint(outcomes):
    """Rank 0 stopped after `_complete` (killed while it pruned, say): rank 1 said "checkpoint
    step_00000002 was not completed ... continues from step_00000002"."""
    rank0, rank1 = outcomes["after_complete"]
    assert rank0 == ("stopped", STEP2)
    assert rank1 == (
        f"checkpoint {STEP2} is complete, but another rank stopped before the save ended (its own error "
        f"says why); rerun with train.resume=auto, which continues from {STEP2}",
        STEP2,
    )


@pytest.mark.slow
def test_a_marked_save_whose_rename_failed_names_the_checkpoint_the_next_start_takes(outcomes):
    """The marker is written, the rename of step_X.tmp fails: the next start publishes it and
    continues from it (`finish_interrupted_publish`), where both ranks said the previous one, and
    rank 0 that step_X "could not be written"."""
    rank0, rank1 = outcomes["publish_fails"]
    assert rank0[1] == rank1[1] == STEP2
    assert rank0[0].startswith(f"checkpoint {STEP2} is complete in "), rank0
    assert "but this rank failed after its marker was written (OSError: " in rank0[0], rank0
    assert rank0[0].endswith(f"rerun with train.resume=auto, which continues from {STEP2}"), rank0
    assert rank1[0].startswith(f"checkpoint {STEP2} is complete, but another rank stopped"), rank1
    assert rank1[0].endswith(f"which continues from {STEP2}"), rank1


@pytest.mark.slow
def test_a_rank_that_stops_before_the_marker_still_names_the_previous_checkpoint(outcomes):
    """Unchanged: no marker, so the save was not completed and the resume takes step 1."""
    rank0, rank1 = outcomes["before_marker"]
    assert rank0 == ("stopped", STEP1)
    assert rank1 == (
        f"checkpoint {STEP2} was not completed: another rank stopped during the save (its own error says "
        f"why); rerun with train.resume=auto, which continues from {STEP1}",
        STEP1,
    )
