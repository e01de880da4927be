"""launch/make_hostfile.sh where SLURM's tools cannot help: range syntax expanded without a usable
scontrol, and slots taken from the allocation in an salloc shell on a login node (the real script in
a subprocess, torch-free, no SLURM daemon); and a launcher variable that is not a number, which
train.py reports in one line.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE_HOSTFILE = REPO / "launch" / "make_hostfile.sh"


# An empty slurm.conf: scontrol (where installed) fails at once, as where it finds no usable
# configuration (a missing file makes it retry for 60 s first).
EMPTY_SLURM_CONF = "/dev/null"


def make_hostfile(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the script with no GPU or SLURM variable of this shell leaking in, and a scontrol (if one
    is installed) without a usable slurm.conf, as on a workstation or another cluster's login node."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_"))}
    base["SLURM_CONF"] = EMPTY_SLURM_CONF
    return subprocess.run(
        ["bash", str(MAKE_HOSTFILE), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-04,07],gpu-a1", ["node01", "node02", "node03", "node04", "node07", "gpu-a1"]),
        ("r[1-2]-n[09-10]", ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ],
)
def test_slurm_ranges_expand_without_a_usable_scontrol(nodelist, hosts):
    """The README's `make_hostfile.sh -s 4 'gpu[01-04]'` wrote every host of the range with slots=4
    where scontrol is missing or finds no slurm.conf (it stopped with 'scontrol could not expand'):
    brackets with lists, ranges keeping their zero padding, several brackets in one name."""
    proc = make_hostfile("-s", "4", nodelist)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{h} slots=4" for h in hosts]


def test_a_malformed_range_is_one_line_that_shows_the_form():
    proc = make_hostfile("-s", "4", "gpu[01-")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "gpu[01-04,07]" in errors[0], proc.stderr
    assert proc.stdout == ""


def test_slots_default_to_the_gpus_per_node_the_allocation_asked_for():
    """In an salloc shell on a login node no GPU of the allocation is visible: the hostfile said
    slots=1 for nodes of 3 GPUs each (SLURM_GPUS_PER_NODE=a100:3) without a word. GPUs visible here
    (CUDA_VISIBLE_DEVICES, narrowed inside the allocation) still win."""
    login = make_hostfile("n1,n2", SLURM_GPUS_PER_NODE="a100:3", SLURM_JOB_NODELIST="n[1-2]")
    assert login.returncode == 0, login.stderr
    assert login.stdout.splitlines() == ["n1 slots=3", "n2 slots=3"]
    typed = make_hostfile("n1", SLURM_GPUS_PER_NODE="a100:2,v100:1")
    assert typed.stdout.splitlines() == ["n1 slots=3"], typed.stderr
    narrowed = make_hostfile("n1", SLURM_GPUS_PER_NODE="3", CUDA_VISIBLE_DEVICES="0,1")
    assert narrowed.stdout.splitlines() == ["n1 slots=2"], narrowed.stderr


def test_help_is_the_header_alone():
    """-h printed the script's first line of code (`set -euo pipefail`) after the header."""
    proc = make_hostfile("-h")
    assert proc.returncode == 0
    assert "NODELIST" in proc.stdout and "set -" not in proc.stdout


@pytest.mark.parametrize("name, value", [("MASTER_PORT", "29500:1"), ("RANK", "${RANK}")])
def test_a_launcher_variable_that_is_not_a_number_is_one_line(monkeypatch, capsys, name, value):
    """int()'s ValueError reached the user as a traceback that named neither the variable nor the
    fix; now train.py stops with one line naming both (exit 2)."""
    from vutrain import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    env = {"VUTRAIN_DEVICE": "cpu", "WORLD_SIZE": "1", "RANK": "0", name: value}
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    code = train.main(["--config", "tiny"])
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
    assert code == 2 and len(lines) == 1, lines
    assert f"{name}={value!r} is not an integer" in lines[0] and f"unset {name}" in lines[0], lines
