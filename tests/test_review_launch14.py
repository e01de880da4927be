"""The SLURM scripts when `scontrol show hostnames` fails or prints nothing; hostfiles; job_gpu_total.

Where scontrol finds no slurm.conf (or its controller is down) srun.sbatch went on with no hosts:
master_addr stopped on "common.sh: line N: $1: unbound variable" in its subshell, and srun was
started with MASTER_ADDR empty ("master :20007"). deepspeed.sbatch with a HOSTFILE refused the file
as naming other nodes than "the job runs on " (nothing). Each now stops with one line that names the
scontrol call and its error, before srun.

The scripts run by hand with a 2-node job's SLURM variables; scontrol and srun are small stand-ins
on PATH (srun records the MASTER_ADDR it was started with), so no cluster is needed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "launch" / "common.sh"
SRUN_SBATCH = ROOT / "launch" / "slurm" / "srun.sbatch"
DEEPSPEED_SBATCH = ROOT / "launch" / "slurm" / "deepspeed.sbatch"
SCONTROL_FATAL = "scontrol: fatal: Could not establish a configuration source"

# SCONTROL_MODE: fail (as with no slurm.conf), empty (exit 0, no output), ok (the job's two nodes).
SCONTROL = f"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then
    case "$SCONTROL_MODE" in
        fail) echo "scontrol: error: fetch_config: DNS SRV lookup failed" >&2
              echo "{SCONTROL_FATAL}" >&2; exit 1 ;;
        empty) exit 0 ;;
        ok) printf 'n1\\nn2\\n' ;;
    esac
fi
exit 0
"""
SRUN = """#!/bin/bash
printf '%s\\n' "$MASTER_ADDR" >"$SRUN_RECORD"
exit 0
"""


def stand_ins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("scancel", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, tmp_path: Path, mode: str, **extra: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{stand_ins(tmp_path)}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "VUTRAIN_ROOT": str(ROOT),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch-%j"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_NTASKS": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": "false",  # no output_dir: the run's end markers are not checked
        "SCONTROL_MODE": mode,
        "SRUN_RECORD": str(tmp_path / "srun-master-addr"),
        **extra,
    }
    return subprocess.run(
        ["bash", str(script), "x=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def assert_refused(proc: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr
    assert not (tmp_path / "srun-master-addr").exists(), "srun was started"


def test_srun_sbatch_stops_when_scontrol_fails(tmp_path):
    """scontrol exits 1: one line with the call and scontrol's own last error; srun never starts."""
    proc = run_script(SRUN_SBATCH, tmp_path, "fail")
    assert_refused(proc, tmp_path, "scontrol show hostnames n[1-2]", SCONTROL_FATAL)


def test_srun_sbatch_stops_when_scontrol_prints_no_host(tmp_path):
    """scontrol exits 0 with no output: one line; no srun with an empty MASTER_ADDR."""
    proc = run_script(SRUN_SBATCH, tmp_path, "empty")
    assert_refused(proc, tmp_path, "scontrol show hostnames n[1-2]", "printed none")


def test_srun_sbatch_starts_srun_on_the_first_node_when_scontrol_works(tmp_path):
    """The working path is kept: srun is started with MASTER_ADDR the first node."""
    proc = run_script(SRUN_SBATCH, tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun-master-addr").read_text().strip() == "n1"


def test_deepspeed_sbatch_with_hostfile_stops_when_scontrol_fails(tmp_path):
    """A HOSTFILE of the job's nodes with scontrol failing: one line naming scontrol, not the file."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    proc = run_script(DEEPSPEED_SBATCH, tmp_path, "fail", HOSTFILE=str(hostfile))
    assert_refused(proc, tmp_path, "scontrol show hostnames n[1-2]", SCONTROL_FATAL)


def test_deepspeed_sbatch_reads_a_hostfile_as_deepspeed_does(tmp_path):
    """Comments, a blank line, CRLF, indents, slots=01 next to slots=1: accepted, master the first host.

    DeepSpeed (int(slots)) and ds_node.sh (10#) read "01" as 1; the script refused the file for
    "different slot counts per host (01 1)".
    """
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"# the job's nodes\r\n\r\n  n2 slots=01 # first\r\n\tn1 slots=1\r\n")
    proc = run_script(DEEPSPEED_SBATCH, tmp_path, "ok", HOSTFILE=str(hostfile))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun-master-addr").read_text().strip() == "n2"


def test_make_hostfile_drops_windows_line_ends_of_a_plain_list(tmp_path):
    """A node list read from a CRLF file ("n1\\r\\nn2\\r\\n"): clean host names (it wrote "n1\\r slots=1")."""
    make_hostfile = ROOT / "launch" / "make_hostfile.sh"
    proc = subprocess.run(
        ["bash", str(make_hostfile), "-s", "1", "n1\r\nn2\r\n"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "n1 slots=1\nn2 slots=1\n"


def run_common(snippet: str, **env: str) -> subprocess.CompletedProcess:
    script = f'set -uo pipefail\nsource "{COMMON}"\n{snippet}\n'
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_master_addr_refuses_an_empty_host_list():
    """master_addr with no host: exit 2 and one line (it was bash's "$1: unbound variable")."""
    proc = run_common("master_addr")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "node list is empty" in lines[0], proc.stderr


def test_job_gpu_total_sums_the_types_of_slurm_gpus():
    """job_gpu_total, shared by the sbatch scripts and make_hostfile.sh: types summed, nothing when unset."""
    assert run_common("job_gpu_total", SLURM_GPUS="a100:2,v100:2").stdout.strip() == "4"
    assert run_common("job_gpu_total", SLURM_GPUS="12").stdout.strip() == "12"
    unset = run_common("job_gpu_total")
    assert unset.returncode == 0 and unset.stdout == ""
