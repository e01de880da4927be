"""Start-up review: the rank logging assumes, and start-up errors across ranks."""

from __future__ import annotations

import pytest

from vutrain.logging_setup import process_rank


def _mpirun_in_srun_step(rank: int, per_node: int = 2, nodes: int = 2, mpi: str = "ompi") -> dict:
    """A rank of `mpirun -np nodes*per_node` inside a SLURM job: mpirun's per-node daemons were
    started by srun, so the rank also carries that step's SLURM_PROCID (its node) and SLURM_NTASKS."""
    node = rank // per_node
    env = {
        "VUTRAIN_DEVICE": "cpu",
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(node),
        "SLURM_NODEID": str(node),
        "SLURM_NTASKS": str(nodes),
        "MASTER_ADDR": "node0",
    }
    if mpi == "ompi":
        env.update(
            OMPI_COMM_WORLD_RANK=str(rank),
            OMPI_COMM_WORLD_SIZE=str(nodes * per_node),
            OMPI_COMM_WORLD_LOCAL_RANK=str(rank % per_node),
            OMPI_COMM_WORLD_LOCAL_SIZE=str(per_node),
        )
    else:
        env.update(
            PMI_RANK=str(rank),
            PMI_SIZE=str(nodes * per_node),
            MPI_LOCALRANKID=str(rank % per_node),
            MPI_LOCALNRANKS=str(per_node),
        )
    return env


@pytest.mark.parametrize("mpi", ["ompi", "pmi"])
def test_mpirun_inside_a_slurm_job_logs_as_its_mpi_rank(mpi):
    """Every rank of node 0 took itself for rank 0 in logging (SLURM_PROCID is the node there), so
    each printed rank 0's library notices and vutrain's INFO lines, while training used the MPI rank."""
    from vutrain.distributed import resolve_dist_env

    for rank in range(4):
        env = _mpirun_in_srun_step(rank, mpi=mpi)
        assert process_rank(env) == resolve_dist_env(env).rank == rank


def test_srun_direct_launch_keeps_slurm_rank():
    """srun --mpi=pmi2: PMI_RANK / PMI_SIZE equal SLURM's, and the SLURM rank stays."""
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "PMI_RANK": "3", "PMI_SIZE": "4"}
    assert process_rank(env) == 3
