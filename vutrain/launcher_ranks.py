"""Which launcher variables hold this process's rank: SLURM's or MPI's (no torch import).

Two readers need the same rules: `vutrain.distributed.resolve_dist_env` (imports torch) and
`vutrain.logging_setup.process_rank` (runs before torch is imported, to quiet ranks > 0). They
were written twice and had to be changed twice (the mpirun-inside-SLURM fix of 2026-12-06).
"""

from __future__ import annotations

from collections.abc import Mapping

# Step ids from here up are SLURM's special steps (batch script, extern, salloc's interactive
# shell: 0xfffffffa and above in slurm.h), never an srun task.
SLURM_SPECIAL_STEPS = 0xFFFFFFFA


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True in a task started by srun; False in the sbatch script or salloc shell itself, which
    export SLURM_PROCID=0 and the job's SLURM_NTASKS although only this one process runs."""
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or ""
    return step.isdigit() and int(step) < SLURM_SPECIAL_STEPS


def mpi_rank_and_size(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(rank, size) from Open MPI's or MPICH / Intel MPI's variables; None for one not a number."""
    if env.get("OMPI_COMM_WORLD_RANK", "") != "":
        return _digits(env.get("OMPI_COMM_WORLD_RANK")), _digits(env.get("OMPI_COMM_WORLD_SIZE"))
    return _digits(env.get("PMI_RANK")), _digits(env.get("PMI_SIZE"))


def mpirun_inside_srun_step(env: Mapping[str, str]) -> bool:
    """True in a rank that mpirun started inside a SLURM job. mpirun starts its per-node daemons
    (Open MPI's orted, Hydra's proxies) with srun, and its ranks inherit that step's SLURM_PROCID
    (the node's index) and SLURM_NTASKS (the node count): the MPI variables, which disagree with
    them, are the ranks' own. Under srun's direct launch (--mpi=pmi2) the two agree."""
    rank, size = mpi_rank_and_size(env)
    if rank is None or size is None:
        return False
    return (rank, size) != (_digits(env.get("SLURM_PROCID")), _digits(env.get("SLURM_NTASKS")))


def _digits(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
