"""Developer tools and the install path: the lock's pins against a CUDA torch, the core-install
check's list of extras, and the profiling tools' one-line errors.

No test installs anything: the installed torch is a real dist-info directory on PYTHONPATH (what
importlib.metadata reads), and the "fresh venv" is this venv's Python started with -S."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import count_step_ops  # noqa: E402
import profile_step  # noqa: E402


def fake_torch(site: Path, version: str, requires: list[str]) -> None:
    """An installed torch as pip leaves its metadata (no code: the tools read only the metadata)."""
    info = site / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: torch", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def for_installed_torch(tmp_path: Path, site: Path, constraints: str, *python_flags: str):
    source, out = tmp_path / "constraints.txt", tmp_path / "out.txt"
    source.write_text(constraints)
    command = [sys.executable, *python_flags, str(REPO / "tools/lock_versions.py")]
    command += ["--for-installed-torch", str(source), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    return done, (out.read_text() if out.exists() else None)


CUDA_TORCH_NEEDS = [
    "filelock",
    "sympy==1.13.1",
    "networkx>=2.5.1",
    "triton==3.5.0",
    'optree>=0.13; extra == "optree"',
]


def test_lock_pins_read_as_pip_reads_them_against_a_cuda_torch(tmp_path):
    site = tmp_path / "site"
    fake_torch(site, "2.11.0+cu130", CUDA_TORCH_NEEDS)
    constraints = textwrap.dedent("""\
        # a comment

        sympy == 1.14.0
        triton==3.5.0 ; python_version >= "3"
        triton==3.9.0 ; sys_platform == "nonexistent-os"
        networkx==3.6.1  # tested with it
        mpmath==1.3.0
    """)
    done, out = for_installed_torch(tmp_path, site, constraints)
    assert done.returncode == 0, done.stderr
    kept = out.splitlines()
    # torch's sympy==1.13.1 rejects 1.14.0 whatever the spaces: pip would refuse the whole install
    assert "sympy == 1.14.0" not in kept and "sympy == 1.14.0" in done.stdout
    # a pin that torch accepts stays, with a marker or a trailing comment (the tested version)
    assert 'triton==3.5.0 ; python_version >= "3"' in kept
    assert "networkx==3.6.1  # tested with it" in kept
    # a pin for another platform is not this install's business
    assert 'triton==3.9.0 ; sys_platform == "nonexistent-os"' in kept
    assert kept[:2] == ["# a comment", ""] and "mpmath==1.3.0" in kept


def test_lock_range_that_excludes_torchs_exact_pin_gives_way(tmp_path):
    site = tmp_path / "site"
    fake_torch(site, "2.5.1+cu124", CUDA_TORCH_NEEDS)
    done, out = for_installed_torch(tmp_path, site, "sympy>=1.14\nnetworkx>=3\ntriton~=3.5.0\n")
    assert done.returncode == 0, done.stderr
    assert out.splitlines() == ["networkx>=3", "triton~=3.5.0"]


def test_lock_without_an_installed_torch_says_so_in_one_line(tmp_path):
    # -S: no site-packages, so no torch; only packaging (what the tool parses with) on the path
    site = tmp_path / "site"
    site.mkdir()
    import packaging

    (site / "packaging").symlink_to(Path(packaging.__file__).parent)
    done, out = for_installed_torch(tmp_path, site, "sympy==1.14.0\n", "-S")
    assert done.returncode != 0 and out is None
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "lock_versions: torch is not installed in this Python; install torch first (make venv does)"
    ]


def core_python(tmp_path: Path, modules: list[str], torch_needs: list[str]) -> Path:
    """A Python that sees only `modules` (stub packages) and a torch's metadata, like a fresh venv."""
    site = tmp_path / "site"
    fake_torch(site, "2.13.0", torch_needs)
    for name in ["simplejpeg", *modules]:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def check_no_extras(python: Path) -> subprocess.CompletedProcess:
    command = ["bash", str(REPO / "tools/check_core_install.sh"), "--no-extras", str(python)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_core_install_check_passes_a_core_install(tmp_path):
    done = check_no_extras(core_python(tmp_path, [], ["filelock"]))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("extra", ["open_clip", "torchvision", "tensorboard", "triton"])
def test_core_install_check_fails_on_each_extra(tmp_path, extra):
    # open_clip and torchvision (the bench extra) were not looked for: the check passed with them
    done = check_no_extras(core_python(tmp_path, [extra], ["filelock"]))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"FAIL: not a core install: {extra} installed"


def test_core_install_check_accepts_the_triton_a_cuda_torch_requires(tmp_path):
    done = check_no_extras(core_python(tmp_path, ["triton"], ["triton==3.5.0; platform_system == 'Linux'"]))
    assert done.returncode == 0, done.stderr


def test_count_step_ops_bad_override_is_one_config_line(capsys):
    assert count_step_ops.main(["--precision", "fp32", "--set", "train.micro_batch_size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "config error: train.micro_batch_size must be >= 1, got 0"


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--batch-size", "0"), ("--warmup", "-1")])
def test_profile_step_refuses_a_count_it_cannot_use(capsys, flag, value):
    # --steps 0 built the trainer, ran the warm-up, then divided by zero in a traceback
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be >= " in capsys.readouterr().err


def test_count_step_ops_leaves_no_scratch_folder(tmp_path, monkeypatch, capsys):
    """Every run left its synthetic shards in a /tmp/vutrain-ops-* folder (profile_step and
    host_python_time the same: one wrapper each), on success and on error."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert count_step_ops.main(["--precision", "fp32", "--set", "train.micro_batch_size=0"]) == 2
    assert not list(tmp_path.glob("vutrain-ops-*"))


def test_make_venv_reinstalls_after_a_change_to_the_pin_filter():
    """`.venv/.installed` depended on setup.py and constraints.txt only: a fix to
    tools/lock_versions.py (which writes .venv/constraints.txt) never reached an existing .venv."""
    proc = subprocess.run(
        ["make", "-n", "-W", "tools/lock_versions.py", "venv"], cwd=REPO, capture_output=True, text=True
    )
    assert "lock_versions.py --for-installed-torch" in proc.stdout, proc.stdout + proc.stderr
