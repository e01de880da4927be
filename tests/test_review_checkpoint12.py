"""Checkpoint saves where a rank's files cannot reach the checkpoint (2 gloo ranks, real DeepSpeed
engines at ZeRO-1): an output_dir that is not one shared folder, and a full disk at the save's
first write.

Each rank is given its own view of the run directory: rank 1 passing another folder than rank 0
is what a node-local output_dir (or a mount missing on one node) looks like from rank 1's node.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from datetime import timedelta

import pytest
import torch
from tiny_modules import TwoLayer
from zero_engines import small_engine

from helpers_dist import run_distributed

STALE, FRESH, SHARED, FULL = "step_00000001", "step_00000002", "step_00000003", "step_00000004"


def _save(ckpt, engine, run_dir, step, rank) -> str:
    """ "saved", or what the save raised (type: message)."""
    try:
        ckpt.save_checkpoint(engine, run_dir, step, {"step": step, "data": {}}, rank, keep=5)
        return "saved"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _on_a_full_disk(ckpt, engine, run_dir, step, rank) -> str:
    """Rank 0 saves with writes past 1000 bytes refused (RLIMIT_FSIZE, SIGXFSZ ignored): its first
    file, the trainer state's RNG tensors (about 5 KB), fails as on a disk that filled up. Rank 0
    then closes its group, as its process would exit, which frees rank 1 from its collective."""
    if rank != 0:
        return _save(ckpt, engine, run_dir, step, rank)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    try:
        return _save(ckpt, engine, run_dir, step, rank)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        torch.distributed.destroy_process_group()


def _saves(rank, world, root):
    """The four saves in turn; rank 0's view of the run is always ROOT/shared."""
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo", timeout=timedelta(seconds=60))  # a lost peer fails, not hangs
    torch.manual_seed(0)
    engine = small_engine(TwoLayer(), stage=1, world=world, micro=2)
    engine.backward(engine(torch.randn(2, 8)))
    engine.step()
    shared = os.path.join(root, "shared")
    stale_view, fresh_view = os.path.join(root, "rank1_stale"), os.path.join(root, "rank1_fresh")
    if rank == 1:  # a folder of the same name on rank 1's own disk, left by an earlier attempt
        os.makedirs(os.path.join(ckpt.checkpoints_dir(stale_view), STALE + ckpt.TMP_SUFFIX))
    said = {
        STALE: _save(ckpt, engine, shared if rank == 0 else stale_view, 1, rank),
        FRESH: _save(ckpt, engine, shared if rank == 0 else fresh_view, 2, rank),
        SHARED: _save(ckpt, engine, shared, 3, rank),
    }
    said[FULL] = _on_a_full_disk(ckpt, engine, shared, 4, rank)
    return said


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """(root, [rank 0's, rank 1's {tag: what its save said}]) from one pair of spawned ranks."""
    root = str(tmp_path_factory.mktemp("ckpt12"))
    return root, run_distributed(_saves, 2, root, init_process_group=False, timeout_s=90)


def _not_seen(root: str, tag: str) -> str:
    tmp_dir = os.path.join(root, "shared", "checkpoints", tag + ".tmp")
    host = socket.gethostname()
    return (
        f"CheckpointWriteError: checkpoint {tag} was not saved: 1 of 2 ranks (rank 1, on {host}) do not "
        f"see {tmp_dir}, which rank 0 made on {host}, so their files would not be in it: output_dir must "
        "be one folder every node mounts (a shared file system such as NFS, Lustre or GPFS, not a "
        "node-local disk such as /tmp); set output_dir to one and rerun"
    )


@pytest.mark.slow
def test_an_output_dir_a_rank_does_not_see_stops_every_rank_with_one_line(saves):
    """Rank 1's node has no such folder. Before, rank 1's first write failed with a safetensors
    traceback (as an OSError it got "free space" advice) and rank 0 waited in a collective until
    the group's timeout."""
    root, (rank0, rank1) = saves
    assert rank0[FRESH] == rank1[FRESH] == _not_seen(root, FRESH)


@pytest.mark.slow
def test_a_stale_folder_of_the_same_name_is_not_taken_for_the_shared_one(saves):
    """Rank 1's node has a leftover folder of that name. Before, rank 1 wrote its files into it and
    rank 0 marked complete a checkpoint without them: its resume failed for want of rank 1's state."""
    from vutrain import checkpoint as ckpt

    root, (rank0, rank1) = saves
    assert rank0[STALE] == rank1[STALE] == _not_seen(root, STALE)
    assert os.listdir(os.path.join(root, "rank1_stale", "checkpoints", STALE + ".tmp")) == []
    # No refused save left a checkpoint, and the next save (step 3) pruned their .tmp folders.
    shared = os.listdir(os.path.join(root, "shared", "checkpoints"))
    assert ckpt.list_tags(os.path.join(root, "shared", "checkpoints")) == [SHARED]
    assert STALE + ".tmp" not in shared and FRESH + ".tmp" not in shared, shared


@pytest.mark.slow
def test_a_save_on_a_shared_output_dir_leaves_no_token_in_the_checkpoint(saves):
    from vutrain import checkpoint as ckpt

    root, (rank0, rank1) = saves
    assert rank0[SHARED] == rank1[SHARED] == "saved"
    tag_dir = os.path.join(root, "shared", "checkpoints", SHARED)
    assert ckpt.verify_tag(tag_dir) is None
    listed = ckpt.read_marker(tag_dir)["files"]
    assert ckpt.SAVE_TOKEN not in listed and not os.path.exists(os.path.join(tag_dir, ckpt.SAVE_TOKEN))
    assert {"trainer_state_rank0.json", "trainer_state_rank1.json"} <= set(listed)


@pytest.mark.slow
def test_a_full_disk_at_the_first_write_is_one_line_per_rank(saves):
    """The trainer state's safetensors file is the first a save writes. safetensors reports a
    refused write as its SafetensorError, neither OSError nor RuntimeError: before, the save let it
    through as a traceback, past the one-line write failure."""
    root, (rank0, rank1) = saves
    ckpt_dir = os.path.join(root, "shared", "checkpoints")
    assert rank0[FULL].startswith(
        f"CheckpointWriteError: checkpoint {FULL} could not be written to {ckpt_dir} (OSError: [Errno 27] "
        "File too large: "
    ), rank0[FULL]
    assert rank0[FULL].endswith(f"which continues from {SHARED} (the partial {FULL}.tmp is replaced)")
    assert rank1[FULL] == (
        f"CheckpointWriteError: checkpoint {FULL} was not completed: another rank stopped during the save "
        f"(its own error says why); rerun with train.resume=auto, which continues from {SHARED}"
    )
