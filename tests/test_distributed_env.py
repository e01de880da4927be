"""How each launcher's environment becomes ranks, node-local sizes and a rendezvous host.

The variables are those the launchers export, checked against the real ones: the deepspeed
launcher's `launch.py` (LOCAL_SIZE, never LOCAL_WORLD_SIZE), SLURM 22+ (an srun task has
SLURM_STEP_ID; the sbatch script and salloc shell do not, though they export SLURM_PROCID=0 and
the job's SLURM_NTASKS; see tests/test_launch_slurm.py for the same on a live cluster), Open MPI
(OMPI_COMM_WORLD_*) and MPICH / Intel MPI's Hydra (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID,
MPI_LOCALNRANKS). Each case failed before the fix it names.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import subprocess

import pytest

from vutrain.distributed import (
    LISTEN_PORTS,
    ephemeral_ports,
    first_hostname,
    free_port,
    resolve_device,
    resolve_dist_env,
    tasks_on_node,
)

CPU = {"VUTRAIN_DEVICE": "cpu"}  # the same answer on a GPU machine
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[01-04]", "node01"),  # was "node": the rendezvous host did not exist
        ("node[01-04,07],gpu3", "node01"),
        ("gpu3,node[1-2]", "gpu3"),
        ("rack[2-3]-n[5,9]", "rack2-n5"),
        ("n1", "n1"),
    ],
)
def test_first_host_of_a_hostlist_without_scontrol(nodelist, first, monkeypatch):
    assert first_hostname(nodelist) == first
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the fallback answers
    env = {
        **CPU,
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": nodelist,
    }
    assert resolve_dist_env(env).master_addr == first


def test_srun_step_on_some_nodes_meets_on_its_own_first_node(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {
        **CPU,
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_STEP_NODELIST": "n2",  # `srun -w n2`: nobody listens on n1
    }
    assert resolve_dist_env(env).master_addr == "n2"


@pytest.mark.parametrize(
    "spec,node,count",
    [("4(x2),3", 0, 4), ("4(x2),3", 1, 4), ("4(x2),3", 2, 3), ("2,1", 1, 1), ("8", 0, 8), ("x", 0, None)],
)
def test_tasks_per_node_expansion(spec, node, count):
    assert tasks_on_node(spec, node) == count


def test_uneven_slurm_layout_gives_each_node_its_own_local_size():
    """srun -N2 -n3: node 0 runs 2 tasks, node 1 one (the first count was taken for every node)."""
    env = {
        **CPU,
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "2,1",
        "SLURM_STEP_TASKS_PER_NODE": "2,1",
        "MASTER_ADDR": "n1",
    }
    info = resolve_dist_env(env)
    assert (info.launcher, info.rank, info.world_size, info.local_world_size) == ("slurm", 2, 3, 1)
    # A step smaller than the job: the step's own layout counts.
    step = dict(env, SLURM_PROCID="0", SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert resolve_dist_env(step).local_world_size == 1


def test_python_in_the_sbatch_script_without_srun_is_one_process(caplog):
    """The batch shell exports SLURM_PROCID=0 and the job's SLURM_NTASKS=4: taken as rank 0 of 4,
    the run waited forever for three ranks nobody started."""
    env = {**CPU, "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4"}
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        info = resolve_dist_env(env)
    assert (info.launcher, info.world_size) == ("single", 1)
    assert "not started by srun" in caplog.text
    salloc_shell = dict(env, SLURM_STEP_ID="4294967290")  # the interactive step of salloc
    assert resolve_dist_env(salloc_shell).world_size == 1


def test_deepspeed_launchers_local_size_is_the_node_local_world():
    """deepspeed --num_nodes 2 --num_gpus 4: LOCAL_SIZE=4 (its launch.py exports no LOCAL_WORLD_SIZE),
    read as a local world of 8 before, so rank 0 took the job for one node."""
    from deepspeed.launcher import launch

    source = inspect.getsource(launch)
    assert 'current_env["LOCAL_SIZE"]' in source and "LOCAL_WORLD_SIZE" not in source
    env = {**CPU, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "MASTER_ADDR": "h0"}
    assert resolve_dist_env(env).local_world_size == 4
    torchrun = dict(env, LOCAL_WORLD_SIZE="4")
    del torchrun["LOCAL_SIZE"]
    assert resolve_dist_env(torchrun).local_world_size == 4


def test_mpich_hydra_ranks_are_read():
    env = {**CPU, "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    info = resolve_dist_env(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == (
        "mpi",
        1,
        2,
        1,
        "127.0.0.1",
    )


@pytest.mark.parametrize(
    "env",
    [
        {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
        {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"},
    ],
    ids=["openmpi", "mpich"],
)
def test_mpirun_over_several_nodes_needs_master_addr(env):
    """Without MASTER_ADDR every node met at its own 127.0.0.1 and waited for the others forever."""
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set: export it as the first node's hostname"):
        resolve_dist_env({**CPU, **env})
    assert resolve_dist_env({**CPU, **env, "MASTER_ADDR": "h0"}).master_addr == "h0"


@pytest.mark.parametrize("backend", ["nccl", "cuda:gloo", "cuda:nccl"])
def test_backend_without_a_cpu_part_on_a_cpu_rank_is_refused(backend):
    """The group started, then the first collective on a CPU tensor failed minutes later."""
    with pytest.raises(RuntimeError, match="has no CPU backend but the device is cpu"):
        resolve_device(0, {"VUTRAIN_DEVICE": "cpu", "VUTRAIN_DIST_BACKEND": backend})
    assert resolve_device(0, {"VUTRAIN_DEVICE": "cpu", "VUTRAIN_DIST_BACKEND": "cpu:gloo,cuda:nccl"})[1]


def _train_stderr(monkeypatch, capsys, env: dict, argv: list[str]) -> tuple[int, list[str]]:
    from vutrain import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = train.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in lines if not line.startswith("[transformers]")]  # torchvision absent


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
            "MASTER_ADDR is not set",
        ),
        ({"VUTRAIN_DIST_BACKEND": "nccl"}, "has no CPU backend"),
    ],
    ids=["mpirun-no-master-addr", "cpu-rank-nccl"],
)
def test_launcher_errors_reach_the_user_as_one_line(monkeypatch, capsys, env, message):
    code, lines = _train_stderr(monkeypatch, capsys, {**CPU, **env}, ["--config", "tiny"])
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_rendezvous_port_in_use_is_one_line_with_advice(monkeypatch, capsys, synthetic_shards, tmp_path):
    """A taken MASTER_PORT ended the run in torch's multi-screen DistNetworkError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**CPU, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        argv = [
            "--config",
            "tiny",
            f"output_dir={tmp_path / 'run'}",
            f"data.train_shards={synthetic_shards['train_shards']}",
            f"data.val_shards={synthetic_shards['val_shards']}",
        ]
        code, lines = _train_stderr(monkeypatch, capsys, env, argv)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: the process group did not start (rank 0 of 1, single launcher"), lines
    assert f"port {port} is taken on this host: set MASTER_PORT to a free port" in lines[0], lines


def test_concurrent_srun_steps_of_one_job_get_their_own_port():
    """Two `srun ... &` steps of one job on the same first node both listened on 20000 + job id."""
    step0 = {**CPU, "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    step1 = dict(step0, SLURM_STEP_ID="1", SLURM_PROCID="1")
    assert resolve_dist_env(step0).master_port == 24242  # launch/common.sh's default_master_port
    assert resolve_dist_env(step1).master_port == 25242
    assert resolve_dist_env(dict(step1, MASTER_PORT="29600")).master_port == 29600


def test_free_port_is_outside_the_range_the_kernel_hands_out():
    """free_port let the OS pick (bind to 0), so it came from the ephemeral range, and an outgoing
    connection elsewhere on the host (the other test worker's gloo ranks) took it before the
    launched rank 0 bound it: 'EADDRINUSE ... port 34661 is taken' in CI."""
    ephemeral = ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert port in LISTEN_PORTS and port not in ephemeral, port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # and it is free


def test_free_port_passes_over_a_taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        picks = {free_port(range(taken, taken + 2)) for _ in range(10)}
    assert taken not in picks, picks


def test_each_test_worker_draws_ports_from_its_own_slice():
    from worker_ports import worker_ports

    env = {"PYTEST_XDIST_WORKER_COUNT": "3"}
    slices = [worker_ports(dict(env, PYTEST_XDIST_WORKER=f"gw{i}")) for i in range(3)]
    assert all(len(s) > 1000 for s in slices)
    assert not set(slices[0]) & set(slices[1]) and not set(slices[1]) & set(slices[2])
    for s in slices:
        # inside free_port's pool, above the SLURM tests' job ports (20000 + job id)
        assert s.start >= LISTEN_PORTS.start + 1000 and s.stop <= LISTEN_PORTS.stop
    assert worker_ports({}) == range(LISTEN_PORTS.start + 1000, LISTEN_PORTS.stop)


def test_free_port_does_not_follow_the_seeded_global_generator():
    """A run seeds `random`; two processes seeded alike then picked the same port."""
    import random

    state, picks = random.getstate(), []
    try:
        for _ in range(3):
            random.seed(0)
            first = free_port()
            random.seed(0)
            picks.append(first == free_port())
    finally:
        random.setstate(state)
    assert not all(picks)


def test_job_derived_master_port_stays_below_the_ephemeral_range():
    """`20000 + job % 20000` gave job 15000 port 35000, inside Linux's ephemeral range (32768+),
    where an outgoing connection on the node may hold it when rank 0 binds it. The trainer's rule
    and launch/common.sh's default_master_port must also agree (step 0)."""
    for job in (0, 4242, 12767, 12768, 15000, 19999, 123456):
        env = {
            **CPU,
            "SLURM_JOB_ID": str(job),
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
        }
        port = resolve_dist_env(env).master_port
        assert port in LISTEN_PORTS, (job, port)
        shell = subprocess.run(
            ["bash", "-c", f"source {REPO}/launch/common.sh && SLURM_JOB_ID={job} default_master_port"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert int(shell.stdout) == port, (job, shell.stdout, port)
        later_step = resolve_dist_env(dict(env, SLURM_STEP_ID="7")).master_port
        assert later_step in LISTEN_PORTS and later_step != port, (job, later_step)
