"""Start-up review 3: a build lock left by a killed process must not hang every later CPU start."""

from __future__ import annotations

import os
import shutil

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import rank_script, run_ranks
from worker_ports import free_port

from vutrain.distributed import remove_stale_baton

REAL_BUILD = os.path.expanduser("~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm")
RANK_SCRIPT = rank_script()  # a group timeout of 2 minutes: _start_two_ranks sets it


def _extensions_dir(tmp_path) -> str:
    """A TORCH_EXTENSIONS_DIR of our own (a lock in the real one would hang other runs), holding
    what the real build folder has, less its locks."""
    root = tmp_path / "torch_extensions"
    folder = root / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    if os.path.isdir(REAL_BUILD):
        for name in os.listdir(REAL_BUILD):
            if name != "lock" and not name.endswith(".flock"):
                try:
                    shutil.copy2(os.path.join(REAL_BUILD, name), folder / name)
                except OSError:  # a file another run's build just replaced
                    pass
    if not (folder / "deepspeed_shm_comm.so").exists():
        pytest.skip(f"no built deepspeed_shm_comm.so in {REAL_BUILD} to copy: start DeepSpeed on CPU once")
    return str(root)


def _ninja_that_keeps_a_built_op(tmp_path) -> str:
    """A PATH entry whose `ninja` leaves a build folder that has its .so as it is, and runs the
    real ninja otherwise. The copied folder lacks ninja's object files and matching logs, so the
    real one would recompile the op (minutes on a loaded 2-core machine); the lock handling under
    test comes before ninja runs."""
    real = shutil.which("ninja")
    if real is None:
        pytest.skip("ninja is not installed: DeepSpeed cannot JIT-load its CPU op")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ninja"
    keep_built = '[ "$1" = "-v" ] && [ -f deepspeed_shm_comm.so ] && exit 0'
    shim.write_text(f'#!/bin/sh\n{keep_built}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    return str(bin_dir)


def _start_two_ranks(extensions_dir: str, path: str, timeout_s: float) -> list[tuple[int | None, str]]:
    """(exit code or None when still running at `timeout_s`, output) of two real CPU ranks on one
    node: both build or load the same shm op, in the same folder."""
    port = free_port()
    one_node = dict(LOCAL_SIZE="2", LOCAL_WORLD_SIZE="2", VUTRAIN_DIST_TIMEOUT_MIN="2")
    one_node.update(TORCH_EXTENSIONS_DIR=extensions_dir, DS_ACCELERATOR="cpu", VUTRAIN_DEVICE="cpu")
    one_node["PATH"] = path + os.pathsep + os.environ.get("PATH", "")
    envs = [rank_env(rank, 2, port, LOCAL_RANK=str(rank), **one_node) for rank in range(2)]
    # A rank still running is killed: ninja has not run (or is the shim), nothing of it outlives the rank.
    return run_ranks(RANK_SCRIPT, envs, timeout_s)


@pytest.mark.slow
def test_stale_build_lock_of_a_dead_process_does_not_block_start(tmp_path):
    """A `lock` file in DeepSpeed's shm-op build folder that no process holds (its maker was
    killed) is removed with one warning naming it, and two CPU ranks start. Before: both ranks
    waited in torch's FileBaton.wait forever (here: still running after 90 s)."""
    extensions_dir = _extensions_dir(tmp_path)
    lock = os.path.join(extensions_dir, "deepspeed_shm_comm", "lock")
    open(lock, "w").close()
    results = _start_two_ranks(extensions_dir, _ninja_that_keeps_a_built_op(tmp_path), timeout_s=90)
    assert [code for code, _ in results] == [0, 0], results
    assert not os.path.exists(lock)
    warnings = [line for _, out in results for line in out.splitlines() if "removed " + lock in line]
    assert len(warnings) == 1, results


def test_build_lock_held_by_a_live_process_is_left_alone(tmp_path):
    """A lock some process has open (a live build) stays; the same file once closed by a process
    that never removed it (a killed one) is removed."""
    lock = str(tmp_path / "lock")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
    try:
        assert remove_stale_baton(lock) is False
        assert os.path.exists(lock)
    finally:
        os.close(fd)
    assert remove_stale_baton(lock) is True
    assert not os.path.exists(lock)
    assert remove_stale_baton(lock) is False  # nothing there: nothing to do
