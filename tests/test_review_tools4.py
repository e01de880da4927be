"""Set-up tools, fourth review: a `make venv` stopped half way is redone, a PATH without python3
is one line that says what to do, `check_core_install.sh` reruns in a WORK_DIR from scratch and
gives its usage errors in one line, and `make lock` refuses pins the oldest allowed Python cannot
install. Nothing is installed: stand-in pythons run the Makefile's and the script's own steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stand_in_python import write_stand_in_python
from test_install import _copy_make_inputs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import lock_versions  # noqa: E402

MAKE = shutil.which("make")

# A .venv python whose pip is killed while installing the package (after torch went in).
PIP_KILLED_AT_THE_PACKAGE = """#!/bin/sh
case "$*" in *"-e .[test]"*) echo "pip: Killed" >&2; exit 137;; esac
exit 0
"""


def _make(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


def test_make_venv_stopped_half_way_is_redone_on_the_next_run(tmp_path):
    """`make test TORCH_SPEC=X` on an installed .venv: torch went in (and into torch-spec.txt), then
    pip was killed installing the rest. `.installed` of the earlier install stayed, so the same
    command again said "Nothing to be done" and ran the tests in the half-installed .venv."""
    _copy_make_inputs(REPO, tmp_path)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(PIP_KILLED_AT_THE_PACKAGE)
    (bin_dir / "python").chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # the earlier, complete install

    stopped = _make(tmp_path, "venv", "TORCH_SPEC=torch==2.5.1")
    assert stopped.returncode != 0 and "pip: Killed" in stopped.stderr, stopped.stdout + stopped.stderr
    assert (tmp_path / ".venv" / "torch-spec.txt").read_text().strip() == "torch==2.5.1"  # the premise

    again = _make(tmp_path, "-n", "venv", "TORCH_SPEC=torch==2.5.1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" not in again.stdout
    assert "-e '.[test]'" in again.stdout, again.stdout


def test_make_venv_without_python3_on_path_says_what_to_do(tmp_path):
    """The shell's "/bin/sh: 1: python3: not found" said neither what is needed nor how to point
    make at another Python."""
    _copy_make_inputs(REPO, tmp_path)
    tools_only = tmp_path / "bin"  # a PATH with the recipe's tools but no python3
    tools_only.mkdir()
    (tools_only / "rm").symlink_to(shutil.which("rm"))
    done = _make(tmp_path, "venv", env={**os.environ, "PATH": str(tools_only)})
    assert done.returncode != 0
    assert (
        "error: python3 not found on PATH: install Python >= 3.11, or make PYTHON=/path/to/python3.11 ..."
        in done.stderr.splitlines()
    ), done.stdout + done.stderr
    assert not (tmp_path / ".venv").exists()


def test_core_install_check_in_a_work_dir_given_again_starts_from_scratch(tmp_path):
    """A WORK_DIR of an earlier check kept its finished `run` (the new training resumed it and
    trained nothing), its exports and its demo_out (which stood in for the new demo's)."""
    python = write_stand_in_python(tmp_path / "python3")
    work = tmp_path / "work"
    stale = [work / "run" / "done.json", work / "hf_model" / "config.json", work / "run_script" / "x"]
    for path in stale:
        path.parent.mkdir(parents=True)
        path.write_text("from the earlier check")
    (work / "demo_out" / "hf_model").mkdir(parents=True)
    (work / "demo_out" / "hf_model" / "config.json").write_text("from the earlier check")
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "check_core_install.sh"), str(work)],
        env={**os.environ, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [path for path in stale if path.exists()] == []
    # the stand-in demo leaves an empty config.json: this one is the new demo's
    assert (work / "demo_out" / "hf_model" / "config.json").read_text() == ""


@pytest.mark.parametrize(
    "args,says",
    [
        (["--no-extras"], "--no-extras takes one PYTHON"),
        (["work", "more"], "one WORK_DIR at most, got 2 arguments"),
        (["--help"], "unknown option --help"),
    ],
)
def test_core_install_check_usage_error_is_one_line(tmp_path, args, says):
    # `--no-extras` alone stopped on "$2: unbound variable", `--help` on mkdir's "unrecognized option"
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "check_core_install.sh"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"usage: tools/check_core_install.sh [WORK_DIR] | --no-extras PYTHON ({says})"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing made


def _report_install(name: str, version: str, requires_python: str | None) -> dict:
    """One entry of `pip install --dry-run --report`'s install list, as pip writes it."""
    metadata = {"name": name, "version": version}
    if requires_python is not None:
        metadata["requires_python"] = requires_python
    return {"metadata": metadata}


def test_lock_refuses_a_pin_the_oldest_allowed_python_cannot_install(capsys):
    """pip resolves for the Python running `make lock`: on 3.13 it can pick a release that dropped
    3.11, which setup.py and the Makefile accept, and a fresh `make venv` on 3.11 then fails on the
    lock. The lock is refused in one line naming the pin, before anything is written."""
    assert lock_versions.python_floor() == "3.11"  # setup.py's python_requires
    installs = [
        _report_install("numpy", "2.9.0", ">=3.12"),
        _report_install("scipy", "1.17.0", ">=3.11"),
        _report_install("six", "1.17.0", None),
        _report_install("torch", "2.13.0", ">=3.12"),  # TORCH_SPEC's: not in the lock
    ]
    assert lock_versions.pins_beyond_python(installs, "3.11") == ["numpy==2.9.0 (Requires-Python >=3.12)"]
    with pytest.raises(SystemExit) as stopped:
        lock_versions.refuse_pins_beyond_python(installs)
    message = str(stopped.value.code)
    assert "\n" not in message
    pin = "numpy==2.9.0 (Requires-Python >=3.12)"
    assert message.startswith(f"lock_versions: {pin}: not installable on Python 3.11")
    assert message.endswith("make clean; make lock PYTHON=python3.11")
    lock_versions.refuse_pins_beyond_python(installs[1:])  # what 3.11 can install passes
