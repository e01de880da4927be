"""launch/local.sh: one node through the real deepspeed launcher (2 CPU ranks without a GPU).

No SLURM needed. Runtime on 2 cores: about 30 s (one tiny 4-step run), 30 s for a SIGTERM sent to
the script (2 ranks checkpoint and exit 75), plus a second for the error cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

from slurm_cluster import REPO

LOCAL = str(REPO / "launch" / "local.sh")


def local_env(**env: str) -> dict[str, str]:
    full_env = dict(
        os.environ,
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    for key in ("NGPUS", "HOSTFILE", "WORLD_SIZE"):
        full_env.pop(key, None)
    full_env.update(env)
    return full_env


def run_local(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", LOCAL, *args], env=local_env(**env), capture_output=True, text=True, cwd=REPO, timeout=600
    )


def gpu_visible() -> bool:
    probe = ["bash", "-c", "command -v nvidia-smi && nvidia-smi -L"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def make_shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(shards), "--num-samples", "32",
         "--shard-size", "8"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The two training runs' shards, read only: written once (a python start of its own)."""
    return make_shards(tmp_path_factory.mktemp("local"))


def pids_running(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (this test's own output_dir)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and marker in (proc_dir / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                pids.append(int(proc_dir.name))
        except OSError:  # gone meanwhile
            pass
    return pids


@pytest.mark.slow
def test_local_two_cpu_ranks(tmp_path, shards):
    if gpu_visible():
        pytest.skip("a GPU is visible: this test covers the CPU-rank path of local.sh")
    out = tmp_path / "run"
    proc = run_local(
        [
            "--config",
            "vutrain/configs/tiny.yaml",
            f"output_dir={out}",
            f"data.train_shards={shards}/train/{{00000..00003}}.tar",
            "data.val_shards=",
            "eval.every=0",
            "train.max_steps=4",
            "train.micro_batch_size=4",
            "train.checkpoint_every=0",
            "data.num_workers=0",
            "train.progress_bar=false",
        ],
        NGPUS="2",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "no GPU visible: 2 CPU rank(s)" in log
    assert "vutrain: world_size=2 " in log, log[-4000:]
    assert json.loads((out / "done.json").read_text())["step"] == 4
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE=/nonexistent/hostfile does not exist"),
        ({"NGPUS": "two"}, "NGPUS must be a positive integer, got 'two'"),
        ({"NGPUS": "2", "WORLD_SIZE": "4"}, "WORLD_SIZE=4 is exported but this allocation gives 2 ranks"),
    ],
    ids=["missing-hostfile", "bad-ngpus", "world-size-mismatch"],
)
def test_local_errors(tmp_path, env, message):
    if (
        "NGPUS" in env
        and env["NGPUS"].isdigit()
        and subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0
    ):
        pytest.skip("GPU machine: NGPUS may exceed the GPUs and fail with another message")
    proc = run_local(["--config", "vutrain/configs/tiny.yaml", f"output_dir={tmp_path / 'run'}"], **env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_local_two_host_hostfile_rejected(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\nb slots=1\n")
    proc = run_local(["--config", "vutrain/configs/tiny.yaml"], HOSTFILE=str(hostfile))
    assert proc.returncode == 2 and "lists 2 hosts; local.sh runs one node" in proc.stderr


def launcher_argv(tmp_path, **env: str) -> tuple[list[str], str]:
    """The deepspeed launcher's command line local.sh builds (a fake PYTHON records it), and stderr."""
    record = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" "CVD=$CUDA_VISIBLE_DEVICES" > {record}\n')
    fake.chmod(0o755)
    proc = run_local(["--config", "vutrain/configs/tiny.yaml"], PYTHON=str(fake), **env)
    assert proc.returncode == 0, proc.stderr
    return record.read_text().splitlines(), proc.stderr


@pytest.mark.parametrize(
    "ngpus,want",
    [(None, "4,5,6,7"), ("2", "4,5")],
    ids=["all-visible", "first-two"],
)
def test_local_places_ranks_on_the_visible_gpus(tmp_path, ngpus, want):
    """CUDA_VISIBLE_DEVICES=4,5,6,7: deepspeed gets the first NGPUS of them in the variable and no
    placement argument, so it turns them into its own --include (--num_gpus made it drop the
    variable and train on GPUs 0-3)."""
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", **({"NGPUS": ngpus} if ngpus else {})}
    argv, _ = launcher_argv(tmp_path, **env)
    assert "--num_gpus" not in argv and "--include" not in argv, argv
    assert argv[-1] == f"CVD={want}", argv
    assert argv[argv.index("deepspeed.launcher.runner") + 1 :].count("vutrain/train.py") == 1


def test_local_narrowed_gpus_inside_an_allocation(tmp_path):
    """Inside a SLURM allocation of 4 GPUs with CUDA_VISIBLE_DEVICES narrowed to 2: 2 are visible.
    NGPUS=4 is the error it is (it started 2 ranks, the first 4 of 2 ids, without a word) and the
    default is those 2."""
    env = {"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "4,5"}
    proc = run_local(["--config", "vutrain/configs/tiny.yaml"], NGPUS="4", **env)
    assert proc.returncode == 2 and "NGPUS=4" in proc.stderr and "2 GPU" in proc.stderr, proc.stderr
    argv, _ = launcher_argv(tmp_path, **env)
    assert argv[-1] == "CVD=4,5", argv


@pytest.mark.parametrize("hostfile", [False, True], ids=["ngpus", "hostfile"])
def test_local_gpu_uuids_keep_num_gpus(tmp_path, hostfile):
    """UUIDs are beyond deepspeed's --include: a warning says the ranks take GPUs 0..N-1 (with a
    HOSTFILE there was no word)."""
    env = {"CUDA_VISIBLE_DEVICES": "GPU-1b2c,GPU-3d4e"}
    if hostfile:
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        env["HOSTFILE"] = str(tmp_path / "hostfile")
    argv, err = launcher_argv(tmp_path, **env)
    assert argv[argv.index("--num_gpus") + 1] == "2" and "--include" not in argv, argv
    assert "not a list of GPU indices" in err


def test_local_hostfile_starts_the_trainer_without_ssh(tmp_path):
    """HOSTFILE with one host: the real deepspeed launcher starts the ranks here, no ssh. Before, it
    first ran `ssh -o PasswordAuthentication=no localhost hostname` and stopped with "host=localhost
    was not reachable via ssh" wherever there is no passwordless ssh. A bad override makes the
    trainer itself end the run in seconds: its message proves that it started."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    proc = run_local(
        ["--config", "vutrain/configs/tiny.yaml", f"output_dir={tmp_path / 'run'}", "train.no_such_key=1"],
        HOSTFILE=str(hostfile),
    )
    log = proc.stdout + proc.stderr
    assert "not reachable via ssh" not in log, log[-3000:]
    assert proc.returncode != 0 and "train.no_such_key" in log and "valid keys" in log, log[-3000:]


def test_local_hostfile_places_ranks_on_the_visible_gpus(tmp_path):
    """HOSTFILE (localhost slots=2) with CUDA_VISIBLE_DEVICES=4,5,6,7: deepspeed ignores the variable
    when given a hostfile and its ranks took GPUs 0 and 1; the run goes on GPUs 4 and 5 instead."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv, _ = launcher_argv(tmp_path, HOSTFILE=str(hostfile), CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert argv[-1] == "CVD=4,5", argv
    assert "--num_gpus" not in argv and "--include" not in argv, argv
    assert argv[argv.index("--hostfile") + 1] != str(hostfile), argv  # the placement, not the file


def test_make_hostfile_plain_list_needs_no_slurm(tmp_path):
    """A comma-separated host list is written as is, outside SLURM: no scontrol call (which fails
    where it finds no SLURM configuration, as on a laptop with the client installed), empty entries
    dropped (a trailing comma made the script exit 1 without a word). Range syntax still needs
    scontrol (tests/test_launch_slurm.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["SLURM_CONF"] = str(tmp_path / "no-such-slurm.conf")
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "make_hostfile.sh"), "-s", "2", "a,b,"],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "a slots=2\nb slots=2\n", proc.stderr
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "make_hostfile.sh"), "-s", "2", ","],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "expanded to no hosts" in proc.stderr


def test_requeue_reads_output_dir_and_resume_from_the_yaml(tmp_path):
    """`sbatch srun.sbatch --config vit-b-32.yaml`: output_dir (and a train.resume) live in the YAML.
    The scripts read them from the command line only, so a requeued job with `resume: never` in its
    YAML restarted from step 0 at every requeue, and preempted.json was never looked for."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"output_dir: {run}\ntrain:\n  resume: never\n")
    script = (
        'source launch/common.sh; OUT="$(output_dir_from_args "$@")"; echo "out=$OUT"; '
        'echo "resume=$(restart_resume "$OUT" "$@")"'
    )
    env = dict(os.environ, PYTHON=sys.executable, SLURM_RESTART_COUNT="1")
    proc = subprocess.run(
        ["bash", "-c", script, "probe", "--config", str(yaml_file), "train.max_steps=8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == [f"out={run}", "resume=train.resume=auto"], proc.stderr
    assert "in place of the submitted train.resume=never" in proc.stderr
    # A command-line override still wins over the YAML; a first start changes nothing.
    proc = subprocess.run(
        [
            "bash",
            "-c",
            script,
            "probe",
            "--config",
            str(yaml_file),
            "train.resume=auto",
            "output_dir=/nowhere",
        ],
        cwd=REPO,
        env=dict(env, SLURM_RESTART_COUNT="0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == ["out=/nowhere", "resume="], proc.stderr


@pytest.mark.slow
def test_local_signal_to_the_script_checkpoints_the_ranks(tmp_path, shards, sig=signal.SIGTERM):
    """SIGTERM or SIGUSR1 to local.sh's own pid (`kill PID`, `docker stop`, a supervisor): the ranks
    checkpoint and the script exits 75. Before, local.sh exec'd deepspeed's runner, which has no
    handler on one node: it died alone (exit 143 / 138) and launch.py and the ranks trained on to
    the end, orphaned, with no checkpoint at the signal. SIGUSR1 takes the same trap (SIGTERM here:
    one 30 s run on CI)."""
    if gpu_visible():
        pytest.skip("a GPU is visible: this test covers the CPU-rank path of local.sh")
    out = tmp_path / "run"
    max_steps = 200  # far beyond the signal, which comes at the first logged step
    args = [
        "--config", "vutrain/configs/tiny.yaml", f"output_dir={out}",
        f"data.train_shards={shards}/train/{{00000..00003}}.tar", "data.val_shards=", "eval.every=0",
        f"train.max_steps={max_steps}", "train.micro_batch_size=4", "train.checkpoint_every=0",
        "data.num_workers=0", "train.progress_bar=false",
    ]  # fmt: skip
    log_path = tmp_path / "local.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            ["bash", LOCAL, *args],
            env=local_env(NGPUS="2"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=180)
        log = log_path.read_text()
        assert rc == 75, f"exit {rc}\n{log[-4000:]}"
        preempted = json.loads((out / "preempted.json").read_text())
        assert preempted["step"] < max_steps and preempted["signal"] == sig.name, preempted
        assert (out / "checkpoints" / f"step_{preempted['step']:08d}").is_dir()
        assert not (out / "done.json").exists()
        assert pids_running(f"output_dir={out}") == [], "ranks or launcher left running"
    finally:
        proc.kill()
        proc.wait()
        for pid in pids_running(f"output_dir={out}"):  # the orphans of a failed run
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_deepspeed_env_file_keeps_values_as_written(tmp_path):
    """ds_node.sh loads .deepspeed_env with load_deepspeed_env: `IFS='=' read key value` dropped
    a value's trailing '=' (a base64 token) and a last line without a newline."""
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("TOKEN=abc=\nNCCL_DEBUG=INFO\nPATH_LIKE=/a b/c=d\nLAST=1")  # no final newline
    script = (
        f"source {REPO}/launch/common.sh && load_deepspeed_env {env_file} && "
        'printf "%s|" "$TOKEN" "$NCCL_DEBUG" "$PATH_LIKE" "$LAST"'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "abc=|INFO|/a b/c=d|1|"
