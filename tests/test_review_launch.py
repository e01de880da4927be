"""Launching on the loopback SLURM cluster (tests/slurm_cluster.py): deepspeed.sbatch's launch dir,
and the ranks of mpirun inside a SLURM job.

Jobs end in seconds: the trainer is started with an unknown override, and its config error proves
that ds_node.sh found its node and started the launcher.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

from vutrain.distributed import resolve_dist_env

from slurm_cluster import REPO, running_cluster

FAST_FAIL_ARGS = ["--config", "vutrain/configs/tiny.yaml", "train.no_such_key=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def job_env(**env: str) -> dict[str, str]:
    return {
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **env,
    }


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "<no log>"


@pytest.mark.slurm
@pytest.mark.slow
def test_concurrent_deepspeed_jobs_each_get_their_own_launch_dir(cluster, tmp_path):
    """VUTRAIN_LAUNCH_DIR=<dir>/%j (cluster.env.example): every job writes its hostfile and env file
    under its own id. Before, %j was taken literally and the example's fixed directory was one for
    all jobs: two jobs starting together (an array, a sweep) overwrote each other's hostfile, and a
    node stopped with "node n1 is not listed in .../hostfile" (or loaded the other job's env)."""
    launch_dir = tmp_path / "launch"
    env = job_env(VUTRAIN_LAUNCH_DIR=f"{launch_dir}/%j")
    jobs = {}
    for node in ("n1", "n2"):
        log = tmp_path / f"{node}.log"
        jobs[node] = (
            cluster.sbatch("-o", str(log), "-N", "1", "-w", node, "launch/slurm/deepspeed.sbatch",
                           *FAST_FAIL_ARGS, **env),
            log,
        )  # fmt: skip
    for node, (job, log) in jobs.items():
        cluster.wait_job(job, timeout=120)
        text = read_log(log)
        assert "is not listed" not in text and "written by job" not in text, text
        assert "train.no_such_key" in text, f"the trainer did not start\n{text}"
        assert (launch_dir / str(job) / "hostfile").read_text() == f"{node} slots=1\n", text
        env_lines = (launch_dir / str(job) / ".deepspeed_env").read_text().splitlines()
        assert f"VUTRAIN_LAUNCH_JOB={job}" in env_lines
    assert not (launch_dir / "%j").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_env_file_written_by_another_job_is_refused(cluster, tmp_path):
    """A launch dir shared without %j: ds_node.sh stops with one line that names the cause and the
    fix when the env file it loads was written by another job. Before, it went on with that job's
    environment (or failed as "not listed" without saying why)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\n")
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("VUTRAIN_LAUNCH_JOB=99999\n")
    log = tmp_path / "node.log"
    wrap = f"srun bash launch/slurm/ds_node.sh {hostfile} {env_file} " + " ".join(FAST_FAIL_ARGS)
    job = cluster.sbatch("-o", str(log), "-N", "1", "-w", "n1", "--wrap", wrap,
                         **job_env(MASTER_ADDR="127.0.0.1"))  # fmt: skip
    start = time.time()
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "FAILED", f"{info}\n{text}"
    assert f"{env_file} was written by job 99999, not by this job {job}" in text, text
    assert "VUTRAIN_LAUNCH_DIR=/shared/scratch/vutrain-launch/%j" in text, text
    assert "train.no_such_key" not in text, "the trainer started with another job's environment"
    assert time.time() - start < 60, text


# What `mpirun -np 4 --map-by node` (Open MPI 4.1) gave rank 2 inside `sbatch -N 2 -n 4` on the
# loopback cluster: mpirun started its orted daemons with srun, one per node, so the rank also
# carries that step's SLURM_PROCID (its node) and SLURM_NTASKS (2 nodes).
OPENMPI_RANK_2_UNDER_SLURM = {
    "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
    "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "8", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_STEP_NODELIST": "n[1-2]", "MASTER_ADDR": "n1", "VUTRAIN_DEVICE": "cpu",
}  # fmt: skip


def test_mpirun_rank_inside_a_slurm_job_is_the_mpi_rank():
    """Before, the srun step's variables won: ranks 0 and 2 were both rank 0 of a world of 2 (and
    every rank of a node took local rank 0, so GPU 0)."""
    info = resolve_dist_env(OPENMPI_RANK_2_UNDER_SLURM)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        "mpi", 2, 4, 1, 2,
    )  # fmt: skip
    # srun's direct launch with --mpi=pmi2 exports PMI_RANK / PMI_SIZE equal to SLURM's: still srun's
    # layout, whose local rank SLURM_LOCALID gives.
    direct = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
              "SLURM_NTASKS": "4", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "8",
              "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_ADDR": "n1", "VUTRAIN_DEVICE": "cpu"}  # fmt: skip
    info = resolve_dist_env(direct)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 3, 4, 1)


RANK_PROBE = """
import datetime, os, sys, torch, torch.distributed as dist
from vutrain.distributed import resolve_dist_env
i = resolve_dist_env()
dist.init_process_group("gloo", rank=i.rank, world_size=i.world_size, timeout=datetime.timedelta(seconds=60),
                        init_method=f"tcp://{i.master_addr}:{i.master_port}")
t = torch.tensor([i.rank]); dist.all_reduce(t)
with open(f"{sys.argv[1]}/rank{i.rank}", "w") as f:
    f.write(f"{i.launcher} {i.rank} {i.world_size} {int(t)}")
dist.barrier()  # no rank leaves while a peer's gloo pair still talks to it
os._exit(0)  # no C++ teardown of gloo's threads at exit: it aborted a rank now and then
"""


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_mpirun_inside_a_slurm_job_forms_one_group(cluster, tmp_path):
    """mpirun -np 4 over the job's 2 nodes: 4 distinct ranks of one world of 4 that all-reduce.
    Before, ranks 0 and 2 (and 1 and 3) were the same rank of a world of 2: EADDRINUSE."""
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    results = tmp_path / "ranks"
    results.mkdir()
    log = tmp_path / "mpirun.log"
    wrap = (
        "export MASTER_ADDR=127.0.0.1 VUTRAIN_DEVICE=cpu; "
        f"mpirun --allow-run-as-root --oversubscribe -np 4 --map-by node {sys.executable} {probe} {results}"
    )
    job = cluster.sbatch("-o", str(log), "-N", "2", "-n", "4", "-D", str(REPO), "--wrap", wrap,
                         **job_env(PYTHONPATH=str(REPO)))  # fmt: skip
    info = cluster.wait_job(job, timeout=180)
    text = read_log(log)
    written = {path.name: path.read_text() for path in results.iterdir()}
    assert written == {f"rank{r}": f"mpi {r} 4 6" for r in range(4)}, text
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"


def test_make_hostfile_takes_one_node_list_and_blanks_as_separators(tmp_path):
    """`make_hostfile.sh -s 8 gpu01 gpu02` wrote a hostfile of gpu01 alone (the rest was dropped
    without a word), and "n1 n2" became the one host "n1n2"."""
    import subprocess

    def run(*args):
        return subprocess.run(
            ["bash", str(REPO / "launch" / "make_hostfile.sh"), *args], capture_output=True, text=True
        )

    proc = run("-s", "8", "gpu01", "gpu02")
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert "got 2 arguments (gpu01 gpu02); pass 'gpu01,gpu02'" in proc.stderr, proc.stderr
    assert run("-s", "2", "n1 n2").stdout == "n1 slots=2\nn2 slots=2\n"
    assert run("-s", "1", "a, b,,c,").stdout == "a slots=1\nb slots=1\nc slots=1\n"
