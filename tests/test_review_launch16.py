"""launch/slurm/ds_node.sh when its launch.py is killed while still importing DeepSpeed, and both
launchers when /tmp/<runner pid>.deepspeed is a stale file this user cannot remove.

DeepSpeed's runner exits 0 when its launch.py dies of a signal. Killed before it wrote its --save_pid
file (while it imports DeepSpeed, seconds), launch.py started no rank: ds_node.sh exited 0 on any
node, a one-node job included (COMPLETED, nothing trained); on a node other than the first the other
nodes then waited at the rendezvous until `srun --wait` ended them, a failed job with no reason.

launch.py refuses to start when /tmp/<runner pid>.deepspeed exists ("pid file exists but
shouldn't"). The launchers remove a stale one first, but not one of another user in sticky /tmp: the
run stopped with launch.py's AssertionError and no line of the launcher's own. That case runs in a
PID and mount namespace of its own (unshare), on a private /tmp owned by another user ("nobody")
that holds a stale file for every pid the namespace hands out, as root without capabilities
(setpriv), who then cannot remove them; it is skipped where that cannot be set up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_kill import endless_tiny_run_args, kill_launch_py_once
from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"
LOCAL_SH = ROOT / "launch" / "local.sh"
CONFIG = ROOT / "vutrain" / "configs" / "tiny.yaml"


def node_env() -> dict[str, str]:
    """The environment srun gives ds_node.sh (SLURMD_NODENAME is set per test), one CPU rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k != "WORLD_SIZE"}
    env.update(
        SLURM_JOB_ID="7", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        VUTRAIN_LEFTOVER_WAIT="60", PYTHONPATH=str(ROOT),
    )  # fmt: skip
    return env


def launch_py_still_importing(procs: dict[int, str], first_seen: dict[str, float]) -> bool:
    """True once a launch.py has run for half a second (the launchers poll every 0.1 s) and has not
    yet written its --save_pid file /tmp/<runner pid>.deepspeed (it does after importing DeepSpeed)."""
    launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
    if not launch_py:
        return False
    runner = Path(f"/proc/{launch_py[0]}/stat").read_text().split(") ")[-1].split()[1]
    assert not Path(f"/tmp/{runner}.deepspeed").exists(), "launch.py imported DeepSpeed within 0.5 s"
    first_seen.setdefault("t", time.monotonic())
    return time.monotonic() - first_seen["t"] >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hosts", "me"), [(["n1"], "n1"), (["n1", "n2"], "n2")], ids=["one_node", "second_of_two_nodes"]
)
def test_ds_node_launch_py_killed_while_importing_is_no_success(tmp_path, hosts, me):
    """launch.py SIGKILLed before its --save_pid file and before any rank: the runner exits 0;
    ds_node.sh exits 1 with one line saying this node started no rank (it exited 0)."""
    args, out = endless_tiny_run_args(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in hosts))
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("")
    node = subprocess.Popen(
        ["bash", str(DS_NODE), str(hostfile), str(env_file), *args],
        env={**node_env(), "SLURMD_NODENAME": me}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    first_seen: dict[str, float] = {}
    stderr = kill_launch_py_once(
        node, out, lambda procs: launch_py_still_importing(procs, first_seen), "ds_node.sh"
    )
    assert node.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "died before it came up" in errors[0] and "no rank" in errors[0], stderr
    if len(hosts) > 1:
        assert "other nodes wait at the rendezvous" in errors[0], stderr
    assert "Traceback" not in stderr, stderr
    assert not (out / "config.yaml").exists()


# The namespace's shell: a private /tmp owned by "nobody", a stale /tmp/N.deepspeed of nobody's for
# every pid N the namespace will hand out, then the launcher ("$@") as root without capabilities
# (no CAP_FOWNER: like any other user, it cannot remove another user's file from a sticky /tmp).
# A checkout under /tmp (CI clones there) would vanish under the private /tmp: it is bound aside
# first and back at its own path after. Exit 99: the namespace could not be set up (skipped).
STALE_PID_FILES = r"""
repo="$PWD" keep=/run/vutrain-test-checkout
case "$repo/" in /tmp/*) mkdir -p "$keep" && mount --bind "$repo" "$keep" || exit 99 ;; esac
mount -t tmpfs -o mode=1777 tmpfs /tmp && chown nobody /tmp || exit 99
case "$repo/" in /tmp/*) mkdir -p "$repo" && mount --bind "$keep" "$repo" && cd "$repo" || exit 99 ;; esac
(cd /tmp && touch {2..3000}.deepspeed && chown nobody ./*.deepspeed) || exit 99
printf 'n1 slots=1\n' >/tmp/hostfile && : >/tmp/deepspeed_env || exit 99
exec setpriv --bounding-set=-all --inh-caps=-all "$@"
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local.sh", "ds_node.sh"])
def test_stale_pid_file_of_another_user_is_one_line(launcher):
    """A stale /tmp/<runner pid>.deepspeed of another user: one line naming it and its owner, exit 2
    (launch.py stopped with an AssertionError, the launcher exited 1 with no line of its own)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root with unshare and setpriv (a private /tmp holding another user's files)")
    trainer = ["--config", str(CONFIG), "output_dir=/tmp/run", "data.train_shards=/tmp/none.tar"]
    if launcher == "local.sh":
        command = ["bash", str(LOCAL_SH), *trainer]
        env = {**node_env(), "NGPUS": "1"}
        env.pop("MASTER_ADDR")
    else:
        command = ["bash", str(DS_NODE), "/tmp/hostfile", "/tmp/deepspeed_env", *trainer]
        env = {**node_env(), "SLURMD_NODENAME": "n1"}
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "bash", "-c", STALE_PID_FILES, "bash",
         *command],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if proc.returncode == 99 or "unshare:" in proc.stderr or "setpriv:" in proc.stderr:
        pytest.skip(f"cannot set up the namespace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    assert ".deepspeed" in errors[0] and "owned by nobody" in errors[0], proc.stderr
