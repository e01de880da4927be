"""DeepSpeed's CPU all-reduce leaves a 69 MB /dev/shm segment per rank behind unless we unlink it.

Before the fix, every CPU DeepSpeed run left `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
files in /dev/shm (41 per CI run, 2.8 GB of RAM until reboot).
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from vutrain.distributed import SHM_BUFFER_PREFIX, shm_buffer_path

from helpers_dist import run_distributed

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


def _init_then_release(rank, world):
    import deepspeed
    import deepspeed.comm as ds_comm
    import deepspeed.comm.comm as ds_comm_impl

    from vutrain.distributed import release_shm_buffer

    deepspeed.init_distributed("gloo")
    if getattr(ds_comm_impl.cdb, "shm_comm_op", None) is None:
        return None  # this DeepSpeed build has no CPU shm all-reduce: nothing to leak
    created = os.path.exists(shm_buffer_path(rank))
    release_shm_buffer()
    after = os.path.exists(shm_buffer_path(rank))
    # The segment stays mapped: DeepSpeed's shm all-reduce still sums across ranks.
    t = torch.full((4,), float(rank + 1))
    ds_comm.inference_all_reduce(t)
    return created, after, t.tolist()


def _vutrain_init(rank, world):
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return os.path.exists(shm_buffer_path(rank)), shm_buffer_path(rank)


def test_release_unlinks_the_segment_and_the_all_reduce_still_works():
    results = run_distributed(_init_then_release, 2, init_process_group=False, env={"LOCAL_SIZE": "2"})
    if results[0] is None:
        pytest.skip("DeepSpeed's CPU shm all-reduce is not built here")
    for created, after, summed in results:
        assert created, "DeepSpeed created no segment: the test would prove nothing"
        assert not after
        assert summed == [3.0] * 4


def test_init_distributed_leaves_no_segment_behind():
    results = run_distributed(_vutrain_init, 2, init_process_group=False, env={"LOCAL_SIZE": "2"})
    assert [exists for exists, _ in results] == [False, False]
    # None of this group's segments (its address and port), whatever rank: another run of the
    # session (a parallel test worker's) may hold its own for a moment.
    (group,) = {path.rsplit("_", 1)[0] for _, path in results}
    assert glob.glob(f"{group}_*") == []


def test_shm_buffer_path_matches_deepspeeds_name():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert shm_buffer_path(1, env) == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_1"


def test_session_sweep_spares_a_segment_a_live_process_maps():
    """conftest's sweep must not remove a concurrent run's segment: a peer still starting up would
    wait forever for the name."""
    import mmap

    from conftest import _mapped_files

    path = f"/dev/shm/{SHM_BUFFER_PREFIX}_{os.getuid()}_sweeptest_{os.getpid()}_0"
    with open(path, "w+b") as fh:
        fh.truncate(4096)
        mapping = mmap.mmap(fh.fileno(), 4096)
    try:
        assert path in _mapped_files()
        mapping.close()
        assert path not in _mapped_files()
    finally:
        os.unlink(path)
