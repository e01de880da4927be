"""vutrain.logging_setup: library notices once (rank 0), a rank's own warnings from every rank."""

from __future__ import annotations

import logging
import warnings

import pytest

from vutrain.logging_setup import LIBRARY_LOGGERS, process_rank, setup_logging


@pytest.fixture
def restore_logging(monkeypatch):
    """setup_logging() changes process-wide state: put the loggers back afterwards."""
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    names = ("vutrain", *LIBRARY_LOGGERS)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    yield
    for name, (level, filters) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters = filters


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def passes(name: str, level: int) -> bool:
    """Whether a record of `level` logged on logger `name` would be emitted."""
    logger = logging.getLogger(name)
    return logger.isEnabledFor(level) and bool(logger.filter(record(name, level)))


def test_process_rank_from_each_launcher():
    assert process_rank({}) == 0
    assert process_rank({"RANK": "3"}) == 3
    assert process_rank({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0"}) == 5
    assert process_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert process_rank({"RANK": "", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}) == 1


def test_other_ranks_keep_errors_and_their_own_warnings(restore_logging):
    with warnings.catch_warnings(record=True) as caught:
        assert setup_logging(rank=1) == 1
        warnings.warn_explicit("deprecated collective", FutureWarning, "x.py", 1, module="torch.distributed")
        warnings.warn_explicit("our own", UserWarning, "trainer.py", 1, module="vutrain.trainer")
    assert [str(w.message) for w in caught] == ["our own"]
    assert not passes("DeepSpeed", logging.WARNING) and passes("DeepSpeed", logging.ERROR)
    assert not passes("transformers.models.clip", logging.WARNING)
    assert passes("vutrain.trainer", logging.WARNING) and not passes("vutrain.trainer", logging.INFO)


def test_library_resetting_its_level_on_import_stays_quiet(restore_logging):
    """DeepSpeed's create_logger() sets its logger's level to WARNING when it is imported."""
    setup_logging(rank=2)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # what importing deepspeed does
    assert not passes("DeepSpeed", logging.WARNING)


def test_rank_zero_shows_library_warnings_and_info(restore_logging):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging(rank=0)
        warnings.warn_explicit("deprecated collective", FutureWarning, "x.py", 1, module="torch.distributed")
    assert len(caught) == 1
    assert passes("DeepSpeed", logging.WARNING) and not passes("DeepSpeed", logging.INFO)
    assert passes("vutrain.trainer", logging.INFO)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "MASTER_ADDR": "h0"},
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"},
        # mpirun started from the sbatch script (or salloc's shell): its ranks inherit the batch
        # shell's SLURM_PROCID=0, and every one of them took itself for rank 0
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "2"},
        {"SLURM_PROCID": "0", "SLURM_STEP_ID": "4294967290", "PMI_RANK": "3", "PMI_SIZE": "4"},
    ],
)
def test_process_rank_is_the_rank_training_resolves(env):
    """The rank logging assumes (before any process group) is the one the run trains as: where
    they differed, every rank of an mpirun inside a SLURM job printed rank 0's library notices."""
    from vutrain.distributed import resolve_dist_env

    env = {"VUTRAIN_DEVICE": "cpu", **env}
    if "OMPI_COMM_WORLD_RANK" in env:
        env.update(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="4")
    assert process_rank(env) == resolve_dist_env(env).rank
