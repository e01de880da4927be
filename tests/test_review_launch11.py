"""expand_hostlist (launch/common.sh) and make_hostfile.sh: a bracket holding an empty range.

SLURM refuses `n[]`, `n[1-2,]` and `n[,1]` as invalid host lists; make_hostfile.sh falls back to
expand_hostlist when scontrol refuses a list (or is missing), and there the empty range expanded to
no host: `n[],m1` wrote a hostfile of m1 alone. No SLURM cluster needed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON_SH = ROOT / "launch" / "common.sh"
MAKE_HOSTFILE = ROOT / "launch" / "make_hostfile.sh"


def expand(nodelist: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'source "{COMMON_SH}"; expand_hostlist "$1"', "_", nodelist],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip


@pytest.mark.parametrize("nodelist", ["n[],m1", "n[]", "m1,n[1-2,]", "n[,1]"])
def test_an_empty_range_in_brackets_is_refused(nodelist):
    """A bracket with an empty range fails (make_hostfile.sh then stops), as SLURM's parser does."""
    proc = expand(nodelist)
    assert proc.returncode != 0, proc.stdout


def test_well_formed_brackets_still_expand():
    """The refusal leaves real ranges alone: lists, padding of either width, several brackets."""
    proc = expand("n[08-10,3],a[1-2]b[3-4],gpu-x.y")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["n08", "n09", "n10", "n3", "a1b3", "a1b4", "a2b3", "a2b4", "gpu-x.y"]


@pytest.mark.parametrize("usable_scontrol", [True, False], ids=["scontrol-refuses", "no-slurm-conf"])
def test_make_hostfile_refuses_a_list_with_an_empty_bracket(tmp_path, usable_scontrol):
    """`make_hostfile.sh 'n[],m1'`: one line saying how to write the list, and no hostfile. Without a
    usable scontrol it wrote `m1 slots=2`, dropping the n nodes; where scontrol refuses the list (it
    prints nothing and exits 0) the line said only that the list "expanded to no hosts"."""
    out = tmp_path / "host dir" / "hostfile"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("SLURM_CONF", None)
    if usable_scontrol:
        conf = tmp_path / "slurm.conf"  # enough for `scontrol show hostnames`, which asks no daemon
        conf.write_text(
            "ClusterName=t\nSlurmctldHost=localhost\nNodeName=m1 CPUs=1\nPartitionName=p Nodes=m1\n"
        )
        env["SLURM_CONF"] = str(conf)
    proc = subprocess.run(
        ["bash", str(MAKE_HOSTFILE), "-s", "2", "-o", str(out), "n[],m1"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert not out.exists(), out.read_text()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot expand node list 'n[],m1'" in lines[0], proc.stderr
