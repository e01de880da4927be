"""Run a function in N real processes joined by a torch.distributed process group (CPU, gloo).

    from helpers_dist import run_distributed
    results = run_distributed(fn, 2, arg1, arg2)    # [fn(0, 2, arg1, arg2), fn(1, 2, ...)]

`fn` must be picklable (a module-level function) because the workers are started with the
"spawn" method; it is called as `fn(rank, world_size, *args)` after the default process group
is initialised (unless `init_process_group=False`, e.g. for code that initialises it itself such
as `deepspeed.init_distributed()`). Each worker also gets the usual launcher environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT) so such code finds the
group. `env` adds variables to the workers' environment from process start (before any
import, e.g. TRITON_INTERPRET=1). Return values travel back through `torch.save`, so tensors, dicts
and lists are fine.
A worker's exception is re-raised in the caller with its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from worker_ports import free_port


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """Set `extra` in os.environ while the workers are spawned (they inherit it), then restore."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    backend: str,
    init_process_group: bool,
    timeout_s: float,
    threads: int,
    sys_path: list[str],
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    sys.path[:] = sys_path  # the test's import roots (pytest inserts them at run time)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    # Several workers share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    if init_process_group:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=timeout_s),
        )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        # Also a group that `fn` started itself (DeepSpeed's): one left to interpreter exit once
        # took a rank down with SIGABRT after its work was done.
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is saved: leave without the interpreter's teardown. The C++ destructors of what
    # `fn` left alive (DeepSpeed engines, their communication extension's threads) aborted a rank
    # once more on a loaded 2-core CI machine ("terminate called without an active exception",
    # SIGABRT; tests/test_grad_norm.py, 2026-12-04) after the group had been destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    init_process_group: bool = True,
    timeout_s: float = 120.0,
    threads_per_worker: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return results by rank.

    `timeout_s` bounds every collective (a rank that dies makes the others fail instead of
    hanging). Raises `torch.multiprocessing.ProcessRaisedException` (with the worker's
    traceback) if any worker raises, or `ProcessExitedException` if one dies.
    """
    for attempt in range(_PORT_ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir, _environ(env or {}):
            port = free_port()
            ours = True  # the segments named after this port are this group's
            try:
                mp.spawn(
                    _worker,
                    nprocs=world_size,
                    join=True,
                    args=(
                        world_size,
                        port,
                        out_dir,
                        backend,
                        init_process_group,
                        timeout_s,
                        threads_per_worker,
                        list(sys.path),
                        fn,
                        args,
                    ),
                )
            except mp.ProcessRaisedException as e:
                # Another process may grab the port between free_port() and the store's bind
                # (parallel test runs); that failure happens before fn runs, so retrying is safe.
                if attempt + 1 < _PORT_ATTEMPTS and _port_taken(str(e)):
                    ours = False  # another group holds the port, and maybe segments named after it
                    continue
                raise
            finally:
                if ours:
                    _unlink_shm_buffers(port, world_size)
            return [
                torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)
            ]
    raise AssertionError("unreachable")


_PORT_ATTEMPTS = 3


def _unlink_shm_buffers(port: int, world_size: int) -> None:
    """Remove the /dev/shm segments DeepSpeed's CPU all-reduce made for this group, if `fn` started
    DeepSpeed without `vutrain.distributed.init_distributed` (which unlinks them itself): 69 MB of
    RAM each, kept until reboot otherwise."""
    from vutrain.distributed import shm_buffer_path

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for rank in range(world_size):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_buffer_path(rank, env))


def _port_taken(message: str) -> bool:
    return "EADDRINUSE" in message or "Address already in use" in message
