"""Packaging review: what `pip install .` gives a user, and `tools/check_core_install.sh DIR`.

The wheel is built from a copy of the tracked files (no network, no build isolation), so the
checkout gets no build/ folder and the installed .venv is not touched.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from stand_in_python import write_stand_in_python

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vutrain", "kernels", "dataset_tools")


@pytest.mark.slow
def test_install_check_takes_a_relative_work_dir_and_python(tmp_path):
    """`tools/check_core_install.sh work` (the README's `check_core_install.sh DIR`) changed into
    work/ and then ran work/venv/bin/python from there: "No such file or directory", exit 127.
    A relative PYTHON failed the same way."""
    (tmp_path / "py").mkdir()
    write_stand_in_python(tmp_path / "py" / "python3")
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "check_core_install.sh"), "work"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHON": "py/python3", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: the core install runs every entry point" in proc.stdout
    assert (tmp_path / "work" / "venv" / "bin" / "vutrain-train").exists()
    assert (tmp_path / "work" / "demo_out" / "hf_model" / "config.json").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip install .` builds, from a copy of the checkout's tracked files."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, out = tmp / "src", tmp / "dist"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run(
        [*build, "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("vutrain-*.whl")
    return zipfile.ZipFile(path)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if re.fullmatch(r"vutrain-[^/]+\.dist-info/" + name, n)]
    return wheel.read(path).decode()


@pytest.mark.slow
def test_wheel_holds_every_tracked_module_and_run_file(wheel):
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    shipped = set(wheel.namelist())
    missing = [name for name in tracked if name not in shipped]
    assert missing == [], f"tracked but not in the wheel: {missing}"
    assert {"vutrain/configs/tiny.yaml", "vutrain/configs/vit-b-32.yaml"} <= shipped
    assert not [n for n in shipped if n.startswith(("tests/", "launch/", "tools/"))]


@pytest.mark.slow
def test_wheel_console_scripts_name_functions_it_ships(wheel):
    section = _dist_info(wheel, "entry_points.txt").split("[console_scripts]", 1)[1]
    scripts = dict(re.findall(r"^([\w-]+) = ([\w.:]+)$", section, flags=re.M))
    assert {"vutrain-train", "vutrain-export", "vutrain-dataset"} <= scripts.keys()
    for name, target in scripts.items():
        module, func = target.split(":")
        path = module.replace(".", "/") + ".py"
        tree = ast.parse(wheel.read(path))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert func in defined, f"{name} = {target}: {path} in the wheel defines no {func}()"


@pytest.mark.slow
def test_wheel_metadata_keeps_open_clip_and_torchvision_out_of_the_core(wheel):
    from packaging.requirements import Requirement

    metadata = Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert metadata["Requires-Python"] == ">=3.11"
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    core = {r.name.lower().replace("_", "-") for r in requirements if r.marker is None}
    assert {"torch", "deepspeed", "pillow", "webdataset"} <= core
    assert not core & {"open-clip-torch", "torchvision", "img2dataset", "triton", "pandas", "pyarrow"}
    bench = [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "bench"})]
    assert [r.name for r in bench] == ["open_clip_torch"]
    (webdataset,) = [r for r in requirements if r.name == "webdataset"]
    assert not webdataset.specifier.contains("0.3.0"), "img2dataset 1.47 requires webdataset<0.3"
