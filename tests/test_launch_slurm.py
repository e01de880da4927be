"""launch/slurm/*.sbatch on a real SLURM cluster (munge + slurmctld + two slurmd) on loopback.

The cluster has two nodes, n1 and n2, each a slurmd of its own on this machine (see
tests/slurm_cluster.py). Every job runs the real trainer (vutrain/train.py, tiny preset, CPU,
gloo) on synthetic shards. Covered:

- deepspeed.sbatch, 1 node x 2 CPU ranks (one deepspeed launcher): world size 2, finished run,
  checkpoint, the generated hostfile.
- deepspeed.sbatch, 2 nodes x 1 rank (one launcher per node, --no_ssh --node_rank) and
  srun.sbatch, 2 nodes x 1 task, preempted with `scancel --signal=USR1|TERM --batch`:
  checkpoint at the preemption step, job requeued by the script, resumed from that step to the end
  (world size 2, finished run, final checkpoint).
- both scripts, 2 nodes x 1 rank, preempted while node n2 is drained; the requeued job is resized
  to 1 node (`scontrol update JobId=N NumNodes=1-1 NumTasks=1`), resumes the 2-rank checkpoint at
  world 1 (`train.global_batch_size` keeps the global batch) and finishes, every step logged once.
- deepspeed.sbatch, 1 node, USR1 while the rank starts up (ignored there): re-sent by the script
  until the trainer checkpoints; requeued and resumed.
- srun.sbatch, 1 node x 2 tasks, plain `scancel JOB`: checkpoint, no requeue.
- the scripts' input errors (tasks not dividing over nodes, WORLD_SIZE mismatch, missing
  hostfile, several tasks per node for deepspeed.sbatch, a HOSTFILE naming other nodes than the
  job's) and make_hostfile.sh.

Runtime on 2 cores: about 7 minutes, 2 of them the two fewer-nodes tests (plus the one-off
apt-get install on a fresh machine).
Skips, with the reason, when SLURM is absent and we are not root to install it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

from slurm_cluster import REPO, SlurmCluster, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 4  # plain runs
PREEMPT_STEPS = 16  # long enough that the signal lands well before the end on 2 cores
EXIT_PREEMPTED = 75
# The trainer's start-up line on rank 0 (the deepspeed launcher's own "dist_world_size=2" must not count).
TRAINER_WORLD_2 = "vutrain: world_size=2 "


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vutrain.data.synthetic",
            "--out",
            str(out),
            "--num-samples",
            "64",
            "--shard-size",
            "16",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return out


def trainer_args(out: Path, shards: Path, max_steps: int) -> list[str]:
    """The tiny config on CPU, small enough for two ranks on two cores."""
    return [
        "--config",
        "vutrain/configs/tiny.yaml",
        f"output_dir={out}",
        f"data.train_shards={shards}/train/{{00000..00003}}.tar",
        "data.val_shards=",
        "eval.every=0",
        f"train.max_steps={max_steps}",
        "train.micro_batch_size=4",
        "train.checkpoint_every=0",
        "data.num_workers=0",
        "train.progress_bar=false",
    ]


def submit(
    cluster: SlurmCluster, tmp: Path, script: str, sbatch_args: list[str], args: list[str], **env: str
) -> tuple[int, Path]:
    """sbatch a launch script from the repo root; return (job id, log file)."""
    log = tmp / f"{Path(script).stem}-{time.monotonic_ns()}.log"
    env = {
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "VUTRAIN_LAUNCH_DIR": str(tmp / "launch"),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    job = cluster.sbatch("-o", str(log), *sbatch_args, f"launch/slurm/{script}", *args, **env)
    return job, log


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "<no log>"


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_first_step(cluster: SlurmCluster, job: int, out: Path, log: Path) -> None:
    """Wait until the job has logged a training step: only then may a test signal it (before the
    trainer installs its handlers USR1 would simply kill it)."""
    deadline = time.time() + 240
    while not metrics_steps(out):
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{read_log(log)[-4000:]}"
        assert time.time() < deadline, f"no training step logged\n{read_log(log)[-4000:]}"
        time.sleep(0.1)


def assert_finished(out: Path, log: str, max_steps: int) -> None:
    assert TRAINER_WORLD_2 in log, log[-4000:]
    assert json.loads((out / "done.json").read_text())["step"] == max_steps
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{max_steps:08d}", tag
    assert any((out / "checkpoints" / tag).iterdir()), "empty checkpoint directory"
    assert max(metrics_steps(out)) == max_steps


# srun.sbatch's finished run is asserted by the srun preemption test (2 tasks, resumed to the end).
@pytest.mark.parametrize(
    "script,sbatch_args,env",
    [
        ("deepspeed.sbatch", ["-N", "1"], {"CPU_RANKS_PER_NODE": "2"}),
    ],
    ids=["deepspeed-1node-2cpuranks"],
)
def test_run_to_completion(cluster, shards, tmp_path, script, sbatch_args, env):
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, script, sbatch_args, trainer_args(out, shards, MAX_STEPS), **env)
    info = cluster.wait_job(job, timeout=300)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info["ExitCode"] == "0:0"
    assert_finished(out, text, MAX_STEPS)
    if script == "deepspeed.sbatch":
        # The hostfile the script built from the allocation, one line per node.
        assert (tmp_path / "launch" / "hostfile").read_text().split("\n")[0] == "n1 slots=2"


@pytest.mark.parametrize(
    "script,sbatch_args,sig",
    [
        ("deepspeed.sbatch", ["-N", "2"], "USR1"),  # one launcher per node, --no_ssh
        ("srun.sbatch", ["-N", "2", "--ntasks-per-node=1"], "TERM"),  # one task per "GPU" over two nodes
    ],
    ids=["deepspeed-2nodes-usr1", "srun-2nodes-term"],
)
def test_preempt_requeue_resume(cluster, shards, tmp_path, script, sbatch_args, sig):
    out = tmp_path / "run"
    args = trainer_args(out, shards, PREEMPT_STEPS)
    if script == "srun.sbatch":
        # Submitted with train.resume=never (a fresh start): the requeue still continues the run
        # (it restarted from step 0, moving this job's own checkpoints aside).
        args.append("train.resume=never")
    job, log = submit(cluster, tmp_path, script, sbatch_args, args)
    wait_first_step(cluster, job, out, log)
    # --batch: only the batch shell gets it, as with `#SBATCH --signal=B:USR1@120`; the script
    # must pass it on to the ranks.
    cluster.run("scancel", f"--signal={sig}", "--batch", str(job))

    info = cluster.wait_job(job, timeout=360)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert info["Restarts"] == "1", f"job was not requeued exactly once: {info}\n{text[-6000:]}"

    # First run: the signal reached the ranks through the batch script, they checkpointed and exited 75.
    assert f"batch script got SIG{sig}" in text
    m = re.search(r"preempted at step (\d+)", text)
    assert m, text[-6000:]
    step = int(m.group(1))
    assert 1 <= step < PREEMPT_STEPS, (
        f"preempted at step {step} of {PREEMPT_STEPS}: the run ended before the signal; raise PREEMPT_STEPS"
    )
    assert f"training step exited with code {EXIT_PREEMPTED}" in text
    assert "requeueing job" in text
    if script == "srun.sbatch":
        assert "train.resume=auto in place of the submitted train.resume=never" in text, text[-6000:]
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir(), "no checkpoint at the preemption step"
    # Second run (same log: --open-mode=append): resumed from that checkpoint and finished.
    assert f"resuming at step {step}" in text, text[-6000:]
    assert text.count(TRAINER_WORLD_2) == 2, text[-6000:]
    steps = metrics_steps(out)
    assert steps[:step] == list(range(1, step + 1))
    assert steps[step:] == list(range(step + 1, PREEMPT_STEPS + 1)), steps  # continued, nothing repeated
    assert not (out / "preempted.json").exists()  # removed when the resumed run started
    assert_finished(out, text, PREEMPT_STEPS)


def test_preemption_during_start_up_is_not_lost(cluster, shards, tmp_path):
    """deepspeed.sbatch: SIGUSR1 while the rank is still starting up (its launcher spawned it, the
    trainer has no handler yet). The rank inherits ds_node.sh's ignored USR1, so that signal is
    lost; the batch script sends it again every VUTRAIN_PREEMPT_RESEND_S seconds until the step
    exits. Before, the job ran on without a checkpoint or a requeue (to its time limit on a real
    cluster: state TIMEOUT, resubmitted by hand)."""
    out = tmp_path / "run"
    # One rank steps in about 0.2 s (slower on a loaded machine): the signal re-sent every second
    # (the least the script allows) lands within a few steps of the trainer's start, well before
    # the 40th. Each step past the preemption is trained again by the resumed run.
    steps = 40
    args = trainer_args(out, shards, steps)
    job, log = submit(cluster, tmp_path, "deepspeed.sbatch", ["-N", "1"], args, VUTRAIN_PREEMPT_RESEND_S="1")
    deadline = time.time() + 120
    while "spawned with command" not in read_log(log):  # the launcher started the rank
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), read_log(log)
        assert time.time() < deadline, read_log(log)[-4000:]
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    assert not metrics_steps(out), "the trainer stepped before the signal: not a start-up signal"
    info = cluster.wait_job(job, timeout=360)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    assert "sending SIGUSR1 again" in text, text[-6000:]
    m = re.search(r"preempted at step (\d+)", text)
    assert m, text[-6000:]
    assert f"resuming at step {m.group(1)}" in text, text[-6000:]
    assert json.loads((out / "done.json").read_text())["step"] == steps


def test_scancel_checkpoints_without_requeue(cluster, shards, tmp_path):
    """A plain `scancel JOB` TERMs the ranks: they checkpoint, but the job stays cancelled."""
    out = tmp_path / "run"
    job, log = submit(
        cluster,
        tmp_path,
        "srun.sbatch",
        ["-N", "1", "--ntasks-per-node=2"],
        trainer_args(out, shards, PREEMPT_STEPS),
    )
    deadline = time.time() + 240
    while not metrics_steps(out):
        assert time.time() < deadline, f"no training step logged\n{read_log(log)[-4000:]}"
        time.sleep(0.5)
    cluster.run("scancel", str(job))
    info = cluster.wait_job(job, timeout=120)
    # CANCELLED shows at once; the batch shell decides about the requeue up to KillWait later.
    deadline = time.time() + 60
    while "not requeueing" not in read_log(log) and time.time() < deadline:
        time.sleep(0.5)
    text = read_log(log)
    assert TRAINER_WORLD_2 in text, text[-4000:]
    assert info["JobState"] == "CANCELLED" and cluster.job(job)["Restarts"] == "0", f"{info}\n{text[-4000:]}"
    m = re.search(r"preempted at step (\d+)", text)
    assert m, text[-4000:]
    assert (out / "checkpoints" / f"step_{int(m.group(1)):08d}").is_dir()
    assert json.loads((out / "preempted.json").read_text())["step"] == int(m.group(1))
    assert "not requeueing" in text, text[-4000:]


@pytest.mark.parametrize(
    "script,sbatch_args,env,message",
    [
        (
            "srun.sbatch",
            ["-N", "2", "-n", "3", "--ntasks-per-node=2"],
            {},
            "do not divide evenly over 2 nodes",
        ),
        (
            "srun.sbatch",
            ["-N", "1", "--ntasks-per-node=2"],
            {"WORLD_SIZE": "3"},
            "WORLD_SIZE=3 is exported but this allocation gives 2 ranks",
        ),
        (
            "deepspeed.sbatch",
            ["-N", "1"],
            {"HOSTFILE": "/nonexistent/hostfile"},
            "HOSTFILE=/nonexistent/hostfile does not exist",
        ),
        (
            "deepspeed.sbatch",
            ["-N", "1", "--ntasks-per-node=2"],
            {},
            "one task per node: got 2 tasks on 1 nodes",
        ),
    ],
    ids=["tasks-not-divisible", "world-size-mismatch", "missing-hostfile", "deepspeed-2-tasks-per-node"],
)
def test_input_errors(cluster, shards, tmp_path, script, sbatch_args, env, message):
    job, log = submit(
        cluster, tmp_path, script, sbatch_args, trainer_args(tmp_path / "run", shards, 2), **env
    )
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "FAILED", f"{info}\n{text}"
    assert message in text, text
    assert not (tmp_path / "run").exists(), "the trainer started despite the error"


def test_make_hostfile(cluster, tmp_path):
    out = tmp_path / "hosts" / "hostfile"
    cluster.run("launch/make_hostfile.sh", "-s", "8", "-o", str(out), "n[1-2]")
    assert out.read_text() == "n1 slots=8\nn2 slots=8\n"
    proc = cluster.run("launch/make_hostfile.sh", "-s", "0", "n1", check=False)
    assert proc.returncode != 0 and "slots must be a positive integer" in proc.stderr
    proc = cluster.run("launch/make_hostfile.sh", check=False, SLURM_JOB_NODELIST="")
    assert proc.returncode != 0 and "no node list" in proc.stderr


# A requeue that comes back on fewer nodes: n2 is drained while the 2-node job runs (as if it
# failed), and the pending requeued job is resized to 1 node, the procedure the README gives.
@pytest.mark.parametrize(
    "script,sbatch_args",
    [
        ("deepspeed.sbatch", ["-N", "2"]),
        ("srun.sbatch", ["-N", "2", "--ntasks-per-node=1"]),
    ],
    ids=["deepspeed-2to1nodes", "srun-2to1nodes"],
)
def test_requeue_on_fewer_nodes(cluster, shards, tmp_path, script, sbatch_args):
    out = tmp_path / "run"
    # global_batch_size keeps the global batch: 4 x 2 ranks x 1 accumulation -> 4 x 1 rank x 2.
    args = [*trainer_args(out, shards, PREEMPT_STEPS), "train.global_batch_size=8"]
    job, log = submit(cluster, tmp_path, script, sbatch_args, args)
    try:
        wait_first_step(cluster, job, out, log)
        # The job keeps running on a draining node; the requeued job cannot get n2 back.
        cluster.run("scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=test-requeue-fewer-nodes")
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        deadline = time.time() + 240
        while not (info := cluster.job(job)).get("JobState") == "PENDING" or info.get("Restarts") != "1":
            assert info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING", "CONFIGURING"), (
                f"{info}\n{read_log(log)[-6000:]}"
            )
            assert time.time() < deadline, f"job not requeued: {info}\n{read_log(log)[-6000:]}"
            time.sleep(0.2)
        # NumNodes=1 alone lowers only the minimum; the task count must follow the node count.
        cluster.run("scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1")
        deadline = time.time() + 60
        while (info := cluster.job(job))["JobState"] == "PENDING":
            assert time.time() < deadline, f"the resized job does not start: {info}"
            time.sleep(0.2)
        info = cluster.wait_job(job, timeout=360)
    finally:
        cluster.run("scontrol", "update", "NodeName=n2", "State=RESUME", check=False)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert info["Restarts"] == "1" and info["NumNodes"] == "1", f"{info}\n{text[-6000:]}"

    m = re.search(r"preempted at step (\d+)", text)
    assert m, text[-6000:]
    step = int(m.group(1))
    assert 1 <= step < PREEMPT_STEPS, f"preempted at step {step} of {PREEMPT_STEPS}; raise PREEMPT_STEPS"
    assert text.count(TRAINER_WORLD_2) == 1 and text.count("vutrain: world_size=1 ") == 1, text[-6000:]
    # The resumed run converted the 2-rank checkpoint and went on at world 1.
    resumed = rf"resumed \S*step_{step:08d}\S* \(written by 2 ranks\) on 1 ranks at step {step}"
    assert re.search(resumed, text), text[-6000:]
    assert metrics_steps(out) == list(range(1, PREEMPT_STEPS + 1))  # every step logged once
    assert json.loads((out / "done.json").read_text())["step"] == PREEMPT_STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{PREEMPT_STEPS:08d}"


def test_srun_default_one_task_per_node(cluster, shards, tmp_path):
    """`sbatch -N 2 srun.sbatch` with no task option: SLURM sets no SLURM_NTASKS, and the script
    starts one task per node, as a plain srun in that allocation does (before: it read 1 task and
    stopped with "1 tasks do not divide evenly over 2 nodes ... instead of -n", an option never
    given). A bad override makes the trainer end the job in seconds: its message proves it started."""
    args = [*trainer_args(tmp_path / "run", shards, 2), "train.no_such_key=1"]
    job, log = submit(cluster, tmp_path, "srun.sbatch", ["-N", "2"], args)
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert "do not divide evenly" not in text, text
    assert "2 nodes x 1 tasks" in text, text
    assert "train.no_such_key" in text and info["JobState"] == "FAILED", f"{info}\n{text}"


def test_stale_master_addr_is_named(cluster, shards, tmp_path):
    """A MASTER_ADDR exported by the submitting shell (left from another job) is kept, since it may
    name an interface of the first node, but when it is none of the job's nodes the log says so
    (before: the rendezvous hung without a word). A bad override ends the job in seconds."""
    args = [*trainer_args(tmp_path / "run", shards, 2), "train.no_such_key=1"]
    job, log = submit(cluster, tmp_path, "srun.sbatch", ["-N", "1"], args, MASTER_ADDR="stale-host.invalid")
    cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert "MASTER_ADDR=stale-host.invalid from the environment names none of the job's nodes" in text, text
    assert "master stale-host.invalid:" in text, text


RANK_PROBE = (
    "import json, sys; from vutrain.distributed import resolve_dist_env as r; i = r(); "
    "print('PROBE', json.dumps([sys.argv[1], i.launcher, i.rank, i.world_size, i.local_world_size, "
    "i.master_addr]), flush=True)"
)


def test_rank_layout_from_live_slurm_environments(cluster, tmp_path):
    """What SLURM itself exports, read by resolve_dist_env, for a job of 3 tasks on 2 nodes (2 + 1):

    - python in the batch script without srun is one process (it was taken for rank 0 of 3 and
      waited for two ranks nobody started);
    - each node of an uneven step has its own local size (node n2 was given n1's 2);
    - a step on n2 alone meets on n2, its own first node (it was sent to n1, the job's).
    """
    script = tmp_path / "probe.sh"
    python = sys.executable
    script.write_text(
        "#!/bin/bash\n"
        f'{python} -c "$PROBE" batch\n'
        f'srun {python} -c "$PROBE" step\n'
        f'srun -N1 -n1 -w n2 {python} -c "$PROBE" n2\n'
    )
    log = tmp_path / "probe.log"
    job = cluster.sbatch("-N2", "-n3", "-o", str(log), str(script), PROBE=RANK_PROBE, MASTER_ADDR="")
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    rows = sorted(json.loads(line.split("PROBE ", 1)[1]) for line in text.splitlines() if "PROBE " in line)
    assert rows == [
        ["batch", "single", 0, 1, 1, "127.0.0.1"],
        ["n2", "slurm", 0, 1, 1, "127.0.0.1"],  # n2's NodeAddr (the name n1/n2 does not resolve here)
        ["step", "slurm", 0, 3, 2, "127.0.0.1"],
        ["step", "slurm", 1, 3, 2, "127.0.0.1"],
        ["step", "slurm", 2, 3, 1, "127.0.0.1"],
    ], text[-3000:]


def test_deepspeed_hostfile_must_list_the_jobs_nodes(cluster, shards, tmp_path):
    """HOSTFILE with as many hosts as the job has nodes, but not the job's (left from another
    allocation): the batch script stops before srun and names both lists. Before, it checked only the
    count: n2's ds_node.sh failed ("not listed"), while n1's launcher started rank 0 of 2, which
    waited for a rank 1 that never came until srun gave up (VUTRAIN_SRUN_WAIT, 300 s by default)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn3 slots=1\n")
    job, log = submit(
        cluster,
        tmp_path,
        "deepspeed.sbatch",
        ["-N", "2"],
        trainer_args(tmp_path / "run", shards, 2),
        HOSTFILE=str(hostfile),
        VUTRAIN_SRUN_WAIT="20",
    )
    start = time.time()
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "FAILED", f"{info}\n{text}"
    assert f"HOSTFILE={hostfile} lists n1 n3 but the job runs on n1 n2" in text, text
    assert not (tmp_path / "run").exists(), "the trainer started despite the error"
    assert time.time() - start < 60, text
    # The job's own nodes in another order pass, and a last line without its newline (an editor's,
    # printf's) counts: ds_node.sh's `read` loop skipped it, so that node stopped with "node n1 is
    # not listed". The trainer starts on both nodes: its message about a bad override, which ends
    # the job in seconds, proves it.
    hostfile.write_text("n2 slots=1\nn1 slots=1")
    args = [*trainer_args(tmp_path / "run", shards, 2), "train.no_such_key=1"]
    job, log = submit(cluster, tmp_path, "deepspeed.sbatch", ["-N", "2"], args, HOSTFILE=str(hostfile))
    info = cluster.wait_job(job, timeout=120)
    text = read_log(log)
    assert "but the job runs on" not in text and "is not listed" not in text, f"{info}\n{text}"
    assert text.count("train.no_such_key") >= 2, f"the trainer did not start on both nodes\n{text}"
