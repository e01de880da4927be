"""Packaging: console scripts resolve, and a missing extra is named in one line.

The real proof, `pip install .` without extras in a fresh virtual environment running every entry
point, is `make install-check` (tools/check_core_install.sh), which `.ci/run` runs.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stand_in_python import write_stand_in_python

REPO = Path(__file__).resolve().parents[1]


def _copy_make_inputs(repo, dst) -> None:
    """The files `make venv` reads or depends on, into `dst` (a scratch copy of the checkout)."""
    import shutil

    (dst / "tools").mkdir(exist_ok=True)
    for name in ("Makefile", "setup.py", "constraints.txt", "tools/lock_versions.py"):
        shutil.copy(repo / name, dst / name)


def test_console_scripts_resolve_to_callables():
    scripts = dict(
        (name, target)
        for name, target in re.findall(r'"([\w-]+)=([\w.:]+)"', (REPO / "setup.py").read_text())
        if ":" in target
    )
    assert {"vutrain-train", "vutrain-export", "vutrain-dataset"} <= scripts.keys()
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.parametrize("missing", ["pandas", "img2dataset"])
def test_dataset_command_without_the_data_extra_says_which(missing, monkeypatch, tmp_path, capsys):
    """As on a core install: the package cannot be imported (None in sys.modules blocks it)."""
    from dataset_tools.__main__ import run

    for name in [m for m in sys.modules if m.startswith("dataset_tools.") and m != "dataset_tools.__main__"]:
        monkeypatch.delitem(sys.modules, name)  # re-imported, so they meet the missing package
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    code = run(
        [
            "build",
            "--input",
            str(REPO / "tests/fixtures/dataset_tools/videos.jsonl"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"dataset_tools build needs the 'data' extra ({missing} is not installed): "
        "pip install 'vutrain[data]'"
    )


def test_hugging_face_kernels_beside_ours_is_one_clear_line(tmp_path):
    """Hugging Face's `kernels` (a transformers>=5.25 requirement) shares our `kernels` import name.

    Its metadata alone makes transformers import `kernels` at import time; it then gets this
    repository's package and fails. The model module must turn that into one line saying what to do
    (before: transformers' "cannot import name 'CUDAProperties' from 'kernels'").
    """
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    version = getattr(import_utils, "KERNELS_MIN_VERSION", None)
    if version is None:
        pytest.skip("this transformers has no hub-kernels integration")
    dist_info = tmp_path / f"kernels-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import vutrain.model"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("ImportError: transformers imported vutrain's `kernels`")
        and "pip uninstall kernels" in last
    )


def _setup_requirement_lists() -> dict[str, list[str]]:
    """setup.py's CORE, DATASET_TOOLS, ... lists, read without running setup()."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    assignments = [node for node in tree.body if isinstance(node, ast.Assign)]
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in assignments
        if isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
    }


def test_constraints_pin_every_requirement_within_setup_py_ranges():
    """`make venv` installs under constraints.txt: a pin outside setup.py's range (a bound changed,
    the lock not refreshed) makes pip refuse the install, a missing one lets a new release in."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins and "vutrain" not in pins, "torch is TORCH_SPEC's, vutrain is this repo"
    lists = _setup_requirement_lists()
    for list_name in ("CORE", "DATASET_TOOLS", "KERNELS", "TEST", "BENCH"):
        for spec in lists[list_name]:
            requirement = Requirement(spec)
            name = canonicalize_name(requirement.name)
            if name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
                continue
            assert name in pins, f"{spec} ({list_name}) is not pinned in constraints.txt: run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {spec}: run `make lock`"
            )


def test_make_rebuilds_a_venv_left_without_pip(tmp_path):
    """A `python -m venv` that failed half way (Debian without python3-venv) leaves .venv/bin/python
    and no pip; every later `make` skipped the creation and failed on "No module named pip"."""
    _copy_make_inputs(REPO, tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    fake = tmp_path / "python3"  # passes the version check, then fails to create the venv, as Debian's
    fake.write_text('#!/bin/sh\ncase "$1" in -c) exit 0;; esac\necho "ensurepip is not available"; exit 1\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["make", "venv", f"PYTHON={fake}"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ".venv has no pip: rebuilding it" in out and "ensurepip is not available" in out, out
    assert ": No module named pip" not in out, out  # python's own words, not the recipe's comment


def test_make_venv_installs_a_torch_spec_given_later(tmp_path):
    """`make test TORCH_SPEC=...` on an existing .venv was silently ignored: torch was installed only
    when missing. A spec given on the command line or in the environment that differs from the one
    `make venv` last installed now reinstalls torch; the default spec still keeps any torch there.
    (`make -n`: the real Makefile's decision, without downloading a torch.)"""
    _copy_make_inputs(REPO, tmp_path)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed").touch()  # an installed .venv, newer than setup.py

    def plan(*args, env=None):
        proc = subprocess.run(
            ["make", "-n", "venv", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, **(env or {})),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    reinstall = 'pip install -q "torch==2.5.1"'
    assert "Nothing to be done" in plan()  # the default spec: whatever torch is there stays
    assert reinstall in plan("TORCH_SPEC=torch==2.5.1")
    assert reinstall in plan(env={"TORCH_SPEC": "torch==2.5.1"})
    (tmp_path / ".venv" / "torch-spec.txt").write_text("torch==2.5.1\n")  # what that install records
    assert "Nothing to be done" in plan("TORCH_SPEC=torch==2.5.1")  # asked again: already there
    assert 'pip install -q "torch==2.13.0"' in plan("TORCH_SPEC=torch==2.13.0")


@pytest.mark.parametrize("passes", [True, False])
def test_install_check_removes_its_temporary_directory_once_it_passes(tmp_path, passes):
    """Every `make install-check` left its work directory, a whole venv with torch (1.4 GB), in /tmp.
    Its own temporary directory now goes when the check passes; a failed check keeps it and says
    where. (The real check, which installs torch, is `make install-check`; here a stand-in python
    runs the script's own steps.)"""
    fake = write_stand_in_python(tmp_path / "python3")
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "check_core_install.sh")],
        env={**os.environ, "PYTHON": str(fake), "TMPDIR": str(temp), "DATASET_EXIT": "2" if passes else "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    left = list(temp.glob("vutrain-core-*"))
    if passes:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK: the core install runs every entry point" in proc.stdout
        assert left == [], left
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert len(left) == 1 and (left[0] / "venv").is_dir()
        assert f"core-install: kept {left[0]} for a look" in proc.stderr


def test_make_venv_lets_an_installed_torch_keep_its_own_pins(tmp_path):
    """A CUDA torch the user installed in .venv is kept, but constraints.txt's triton==3.9.0 (the
    lock's, beside the CPU torch) contradicted its `triton==3.7.0`: pip refused the whole install
    (ResolutionImpossible). `make venv` now installs under constraints.txt less the pins the
    installed torch rejects. (A stand-in torch's metadata, as a CUDA torch 2.12 declares it.)"""
    site = tmp_path / "site"
    dist_info = site / "torch-2.12.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.12.0\nRequires-Dist: filelock\n"
        "Requires-Dist: sympy>=1.13.3\n"
        'Requires-Dist: triton==3.7.0; platform_system == "Linux"\n'
        'Requires-Dist: opt-einsum>=3.3; extra == "opt-einsum"\n'
    )
    lock = (REPO / "constraints.txt").read_text()
    assert "\ntriton==3.9.0\n" in lock and "\nsympy==1.14.0\n" in lock  # the premise
    held = tmp_path / "held.txt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "lock_versions.py"), "--for-installed-torch"]
        + [str(REPO / "constraints.txt"), "--out", str(held)],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "left to the installed torch: triton==3.9.0" in proc.stdout
    assert held.read_text() == lock.replace("\ntriton==3.9.0\n", "\n")  # sympy 1.14 suits it: kept

    _copy_make_inputs(REPO, tmp_path)
    plan = subprocess.run(["make", "-n", "venv"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert (
        "tools/lock_versions.py --for-installed-torch constraints.txt --out .venv/constraints.txt"
        in plan.stdout
    )
    assert "-c .venv/torch-constraint.txt -c .venv/constraints.txt -e '.[test]'" in plan.stdout
    no_pins = subprocess.run(
        ["make", "-n", "venv", "CONSTRAINTS="], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "lock_versions" not in no_pins.stdout and "constraints.txt -e" not in no_pins.stdout
