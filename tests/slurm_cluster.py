"""A real SLURM cluster on loopback for the launch tests.

`SlurmCluster(root, nodes=("n1", "n2"))` renders `launch/testing/slurm.conf.template` into
`root`, starts a private `munged` (own key, own socket), one `slurmctld` and one `slurmd` per
node name (`slurmd -N <name>`, each on its own port; several daemons per host work because
every node has a distinct NodeHostname and all of them share NodeAddr=127.0.0.1), and stops
them again. Every file lives under `root`; only the Debian packages are installed system-wide
(`ensure_slurm_installed`).

Nothing here fakes SLURM: jobs go through sbatch -> slurmctld -> slurmd -> slurmstepd.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from worker_ports import free_port

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "launch" / "testing" / "slurm.conf.template"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel")


def slurm_missing() -> list[str]:
    """Names of the SLURM/munge binaries not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_slurm_installed() -> str | None:
    """Install Debian's SLURM and munge packages when missing.

    Returns None when everything is available, else the reason the tests must skip
    (not root, no apt-get, install failed).
    """
    if not slurm_missing():
        return None
    if os.geteuid() != 0:
        return f"SLURM not installed ({', '.join(slurm_missing())} missing) and not root to apt-get it"
    if shutil.which("apt-get") is None:
        return "SLURM not installed and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}"
    missing = slurm_missing()
    return f"still missing after apt-get: {missing}" if missing else None


class SlurmCluster:
    """munged + slurmctld + one slurmd per node name, all state under `root`."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    # ---------------------------------------------------------------- start/stop
    def start(self, timeout: float = 60.0) -> None:
        """Render the config, start the daemons, wait until every node is idle."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "ctld").mkdir(exist_ok=True)
        self._start_munge()
        self._render_conf()
        sbin = "/usr/sbin"
        self._spawn([f"{sbin}/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for node in self.nodes:
            # -N: this daemon serves node <node>; distinct ports come from Port= in the config.
            self._spawn([f"{sbin}/slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd.{node}.out")
        self.wait_nodes_idle(timeout)

    def stop(self) -> None:
        """Stop the daemons we started (by pid) and wait for them."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        # --force: munged refuses to run as root otherwise; -F keeps it in the foreground
        # so we own its pid and can stop exactly it.
        self._spawn(
            [
                "/usr/sbin/munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            "munged.out",
        )
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}: {self._tail('munged.out')}")
            time.sleep(0.2)

    def _render_conf(self) -> None:
        lines = []
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} "
                f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN"
            )
        text = TEMPLATE.read_text()
        subs = {
            "@CTLD_HOST@": socket.gethostname().split(".")[0],
            "@CTLD_PORT@": str(free_port()),
            "@SLURMD_PORT@": str(free_port()),
            "@MUNGE_SOCKET@": str(self.munge_socket),
            "@STATE_DIR@": str(self.root),
            "@NODES@": "\n".join(lines),
        }
        for key, val in subs.items():
            text = text.replace(key, val)
        self.conf.write_text(text)

    def _spawn(self, cmd: list[str], log: str) -> None:
        out = open(self.root / log, "w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env()))

    def _tail(self, name: str, n: int = 3000) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-n:] if path.exists() else f"<no {name}>"

    # ---------------------------------------------------------------- client side
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for SLURM clients: SLURM_CONF points at our config."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, scontrol, ...) against this cluster."""
        # cwd=REPO: sbatch jobs start in the submit directory, where the scripts find the repo.
        proc = subprocess.run(list(cmd), env=self.env(**extra), capture_output=True, text=True, cwd=REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
        return proc

    def wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} exited {proc.returncode}\n"
                        f"{self._tail('slurmctld.log')}\n{self._tail('slurmctld.out')}"
                    )
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True
            )
            out = proc.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) >= set(self.nodes) and all(states[n] == "idle" for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nodes not idle after {timeout}s: {out!r}\n{self._tail('slurmctld.log')}")

    def sbatch(self, *args: str, **extra: str) -> int:
        """Submit; return the job id."""
        out = self.run("sbatch", "--parsable", *args, **extra).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(
        self,
        job_id: int,
        states: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ),
        timeout: float = 240.0,
    ) -> dict[str, str]:
        """Poll until the job reaches one of `states`; return its record."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            # Short: a failing job ends in about a second, and every test waits here at least once.
            time.sleep(0.2)
        raise TimeoutError(
            f"job {job_id} not in {states} after {timeout}s: {info}\n{self._tail('slurmctld.log')}"
        )


def running_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """Body of the SLURM test modules' `cluster` fixture: nodes n1 and n2, stopped afterwards.

    Skips, with the reason, where SLURM cannot be installed; under CI=true (root) it must run.
    """
    import pytest

    reason = ensure_slurm_installed()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"SLURM tests cannot run in CI: {reason}")
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("n1", "n2"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
