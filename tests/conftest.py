"""Shared fixtures, and the one place that decides which tests are `slow`.

`make test` runs everything; `make test-fast` runs `-m "not slow and not slurm and not gpu"`: the
tests that stay in this process. A test is slow when it starts another process: a command
(`subprocess`), a launcher (deepspeed, torchrun, srun/sbatch), a spawned process group
(`helpers_dist.run_distributed`) or a process pool (img2dataset). DataLoader workers do not count.
Mark a new test `@pytest.mark.slow` yourself; `pytest_collection_modifyitems` below also marks
whole modules listed in SLOW_MODULES, modules that import the launcher helpers, and tests whose
body (or a helper of the same module that it calls) starts a process.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
from functools import cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations phones home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

# Triton's interpreter must be chosen before Triton is first imported anywhere in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test in these modules starts processes (launchers, sbatch, spawned ranks, process pools).
SLOW_MODULES = {
    "test_train_deepspeed.py",  # deepspeed / torchrun runs on 2 CPU ranks
    "test_demo_and_bench.py",  # python -m vutrain.demo / vutrain.bench
    "test_launch_slurm.py",  # a private SLURM cluster
    "test_launch_local.py",  # launch/local.sh
    "test_kernels_compile.py",  # Triton's ptxas in a subprocess
    "test_kernels_bench.py",  # python -m kernels.bench
    "test_kernels_cliploss.py",  # spawned gloo ranks
    "test_dataset_tools_build.py",  # img2dataset's spawn pool
}
# Importing one of these helpers means the module drives real runs.
LAUNCHER_HELPERS = ("train_runner", "slurm_cluster")
# A call in a test body (or in a same-module helper it calls) that starts a process.
STARTS_PROCESS = re.compile(
    r"\b(run_distributed|subprocess\.(run|Popen|call|check_call|check_output)"
    r"|mp\.spawn|multiprocessing\.spawn|os\.fork|Popen)\s*\("
)


@cache
def _module_starts_launchers(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(name.split(".")[0] in LAUNCHER_HELPERS for name in names):
            return True
    return False


def _starts_process(func, module, seen: set) -> bool:
    """Whether `func`'s source, or a function of `module` that it calls by name, starts a process."""
    if func in seen:
        return False
    seen.add(func)
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if STARTS_PROCESS.search(source):
        return True
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", source)):
        helper = inspect.unwrap(getattr(module, name, None) or (lambda: None))  # through lru_cache etc.
        if inspect.isfunction(helper) and helper.__module__ == module.__name__:
            if _starts_process(helper, module, seen):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    """Mark the tests that start processes `slow` (see the module docstring)."""
    for item in items:
        if item.get_closest_marker("slow") or not isinstance(item, pytest.Function):
            continue
        path = str(item.fspath)
        if (
            os.path.basename(path) in SLOW_MODULES
            or _module_starts_launchers(path)
            or _starts_process(inspect.unwrap(item.function), item.module, set())
        ):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))  # one cluster, one apt-get at a time


@pytest.fixture
def single_process(monkeypatch):
    """For a Trainer in this process (tests/inprocess_trainer.py): a plain `python` run's environment.

    init_distributed() exports RANK/WORLD_SIZE/MASTER_* for DeepSpeed; deleting them through
    monkeypatch first makes pytest remove them again afterwards. One intra-op thread, as the launcher
    tests give each rank (OMP_NUM_THREADS=1): on a loaded 2-core machine two spinning threads per op
    made these runs 4x slower.
    """
    from vutrain.distributed import cleanup

    from inprocess_trainer import DIST_ENV

    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    cleanup()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """256 training samples in 4 shards, 48 held out: for in-process Trainer runs of a few steps."""
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("tiny_shards")
    return write_synthetic(str(out), num_samples=256, shard_size=64, val_samples=48, seed=0)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """{"train_shards", "val_shards", "num_samples", "dir"}: 1024 training samples in 8 shards."""
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    info = write_synthetic(str(out), num_samples=1024, shard_size=128, val_samples=96, seed=0)
    info["dir"] = str(out)
    return info


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ as it found it.

    An in-process trainer or benchmark exports RANK / WORLD_SIZE / MASTER_* for DeepSpeed
    (init_distributed); a later test's launcher (sbatch, deepspeed, torchrun) would inherit them
    and refuse its allocation ("WORLD_SIZE=1 is exported but this allocation gives 2 ranks").
    """
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def _shm_pattern() -> str:
    from vutrain.distributed import SHM_BUFFER_PREFIX

    return f"/dev/shm/{SHM_BUFFER_PREFIX}_{os.getuid()}_*"


_SHM_BEFORE = pytest.StashKey[set]()  # the segments there when the session started


def _is_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_sessionstart(session):
    """Note the DeepSpeed /dev/shm segments there before the session (see pytest_sessionfinish)."""
    import glob

    if not _is_xdist_worker():
        session.config.stash[_SHM_BEFORE] = set(glob.glob(_shm_pattern()))


def pytest_sessionfinish(session):
    """Remove the DeepSpeed /dev/shm segments this session's runs left behind (69 MB each until
    reboot; 41 per full run before vutrain unlinked its own, enough to make the 24 GB CI machine
    thrash over a day). vutrain's ranks and `run_distributed` unlink theirs; this catches a script
    started through a launcher that reaches DeepSpeed another way. Segments that were there before
    the session, or that a live process maps (a concurrent run's: a peer still starting would wait
    forever for a name removed under it), stay. With parallel workers (`make test`'s `-n`) only
    the controller sweeps, once every worker has finished: a worker done early would otherwise
    sweep while the other still runs."""
    import glob

    before = session.config.stash.get(_SHM_BEFORE, None)
    if before is None:  # an xdist worker: the controller sweeps
        return
    for path in set(glob.glob(_shm_pattern())) - before - _mapped_files():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _mapped_files() -> set[str]:
    """Paths of the files any process on the machine (that we may read) has mapped now."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps, encoding="utf-8", errors="replace") as fh:
                for line in fh:  # address perms offset device inode [path]
                    fields = line.split(None, 5)
                    if len(fields) == 6:
                        mapped.add(fields[5].strip())
        except OSError:  # the process ended, or is not ours to read
            continue
    return mapped


@pytest.fixture
def counted_reads(monkeypatch):
    """Bytes returned by every ``read`` of the shard files the raw reader opens (what a reader that
    should skip members really reads)."""
    import io

    import vutrain.data.samples as samples_mod

    read = []

    class Counted(io.BufferedReader):
        def read(self, n=-1):
            out = super().read(n)
            read.append(len(out))
            return out

    monkeypatch.setattr(samples_mod, "_open", lambda url: Counted(io.FileIO(url)))
    return read
