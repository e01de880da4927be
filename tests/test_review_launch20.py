"""The sbatch scripts on a requeue: train.resume=auto replaces the submitted train.resume, and a job
whose requeues are used up (VUTRAIN_MAX_RESTARTS) still exits 75.

A requeued job submitted with `train.resume=never` had train.resume=auto appended after it: the
trainer then warned that train.resume "is given 2 times ... remove the others if that is not the one
you meant", beside the script's own line saying what replaced what. VUTRAIN_MAX_RESTARTS=0 (never
requeue) stopped the batch script at the preemption with "SLURM_RESTART_COUNT: unbound variable" on
a first start (SLURM sets it only once a job restarted): exit 1 instead of 75, after the checkpoint.

The SLURM tests run the sbatch scripts on the loopback cluster (tests/slurm_cluster.py) with
test_review_launch6's stand-in trainer (or deepspeed launcher), which records its arguments and
exits $STAND_IN_EXIT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_review_launch6 import DEEPSPEED, SRUN, log_text, preempted_job_not_requeued, submit

from slurm_cluster import REPO, running_cluster

CONFIG = "vutrain/configs/tiny.yaml"
REPEATED = "train.resume is given"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def run_with_restart_resume(run: Path, args: list[str], restarts: str) -> subprocess.CompletedProcess:
    """args_with_restart_resume (common.sh, as the sbatch scripts call it), then the trainer's config
    reading of the arguments it gives: one line per argument, then the train.resume it reads."""
    script = (
        'source launch/common.sh; args_with_restart_resume "$OUT" "$@"; printf "%s\\n" "${RUN_ARGS[@]}"; '
        '"$PYTHON" -m vutrain.config --get train.resume "${RUN_ARGS[@]}"'
    )
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(run), SLURM_RESTART_COUNT=restarts)
    return subprocess.run(
        ["bash", "-uc", script, "probe", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("before", [[], ["--"]], ids=["overrides", "after-double-dash"])
def test_requeue_replaces_the_submitted_resume_instead_of_repeating_it(tmp_path, before):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    args = ["--config", CONFIG, *before, f"output_dir={run}", "train.resume=never", "train.max_steps=8"]
    proc = run_with_restart_resume(run, args, "1")
    assert proc.returncode == 0, proc.stderr
    *run_args, resume = proc.stdout.splitlines()
    kept = ["--config", CONFIG, *before, f"output_dir={run}", "train.max_steps=8"]
    assert run_args == [*kept, "train.resume=auto"]
    assert resume == "auto"
    # Told once, by the script; the trainer's config reading no longer warns of a repeated key.
    told = "train.resume=auto in place of the submitted train.resume=never"
    assert proc.stderr.count(told) == 1, proc.stderr
    assert REPEATED not in proc.stderr, proc.stderr


def test_a_first_start_or_a_yaml_resume_keeps_the_arguments(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    # --conf: an abbreviation of --config, whose file is never taken for an override.
    args = ["--conf", CONFIG, f"output_dir={run}", "train.resume=never"]
    proc = run_with_restart_resume(run, args, "0")
    assert proc.stdout.splitlines() == [*args, "never"], proc.stderr
    assert "in place of" not in proc.stderr
    # train.resume from the YAML alone: nothing to replace, auto is added once.
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"output_dir: {run}\ntrain:\n  resume: never\n")
    proc = run_with_restart_resume(run, ["--config", str(yaml_file)], "2")
    assert proc.stdout.splitlines() == ["--config", str(yaml_file), "train.resume=auto", "auto"], proc.stderr
    assert REPEATED not in proc.stderr


@pytest.mark.slurm
@pytest.mark.parametrize("script", [SRUN, DEEPSPEED], ids=["srun", "deepspeed"])
def test_requeued_job_passes_the_trainer_one_resume(cluster, tmp_path, script):
    """The real sbatch script as a requeued start (SLURM_RESTART_COUNT=1, a checkpoint in output_dir):
    the trainer gets train.resume=auto once, in place of the submitted never."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    args = ["--config", CONFIG, f"output_dir={run}", "train.resume=never"]
    job, log = submit(cluster, tmp_path, script, args, SLURM_RESTART_COUNT="1")
    info = cluster.wait_job(job, timeout=120)
    text = log_text(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    argv = (tmp_path / "argv").read_text().splitlines()
    argv = argv[[i for i, arg in enumerate(argv) if arg.endswith("train.py")][0] + 1 :]
    assert argv == ["--config", CONFIG, f"output_dir={run}", "train.resume=auto"], text
    assert text.count("in place of the submitted train.resume=never") == 1, text


@pytest.mark.slurm
def test_no_requeue_allowed_still_exits_75_on_a_first_start(cluster, tmp_path):
    """VUTRAIN_MAX_RESTARTS=0 and a preempted training (exit 75) on the job's first start: the job
    ends with 75 and one line saying why it is not requeued (before: "SLURM_RESTART_COUNT: unbound
    variable", exit 1)."""
    args = ["--config", CONFIG, f"output_dir={tmp_path / 'run'}"]
    text = preempted_job_not_requeued(cluster, tmp_path, SRUN, args, VUTRAIN_MAX_RESTARTS="0")
    assert "unbound variable" not in text, text
    assert "already restarted 0 times (VUTRAIN_MAX_RESTARTS=0); not requeueing" in text, text
