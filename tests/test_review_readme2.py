"""The `--help` a README reader types: defaults the README quotes, sibling benchmarks, program names.

`dataset_tools build --help` showed none of the defaults the README quotes (16 connections, 50
requests/s, 3 retries, shards of 1000); `python -m vutrain.bench --help` did not name `--compare
open_clip` or `data`; `python -m kernels.bench` and `python -m dataset_tools.bench` called
themselves `bench.py`, and the `vutrain-export` console script `python -m vutrain.export`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from slurm_cluster import REPO

pytestmark = pytest.mark.slow  # every test starts a process

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def help_text(*args: str) -> str:
    proc = subprocess.run([*args, "--help"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return " ".join(proc.stdout.split())  # argparse wraps lines: compare as one line


def test_dataset_tools_help_gives_the_defaults_the_readme_quotes():
    build = help_text(sys.executable, "-m", "dataset_tools", "build")
    for option, default in [
        ("--max-connections", "16"),
        ("--requests-per-second", "50.0"),
        ("--retries", "3"),
        ("--shard-size", "1000"),
        ("--image-size", "256"),
        ("--resize-mode", "keep_ratio"),
        ("--variants", "maxresdefault,sddefault,hqdefault,mqdefault"),
    ]:
        start = build.index(option, build.index("options:"))
        assert f"(default: {default})" in build[start : start + 300], (option, build[start : start + 300])
    assert "(default: None)" not in build and "(default: False)" not in build
    split = help_text(sys.executable, "-m", "dataset_tools", "split")
    assert "(default: channel)" in split and "samples per output shard (default: 1000)" in split
    dedup = help_text(sys.executable, "-m", "dataset_tools", "dedup")
    assert "Hamming distance (default: 4)" in dedup


def test_bench_help_names_its_siblings_and_its_results_file():
    text = help_text(sys.executable, "-m", "vutrain.bench")
    assert "python -m vutrain.bench --compare open_clip" in text and "python -m vutrain.bench data" in text
    assert "(default bench_results/train_bench.json)" in text


@pytest.mark.parametrize("module", ["kernels.bench", "dataset_tools.bench"])
def test_bench_modules_name_the_command_that_runs_them(module):
    assert help_text(sys.executable, "-m", module).startswith(f"usage: python -m {module} ")


def test_export_console_script_names_itself():
    script = shutil.which("vutrain-export", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("vutrain-export is not installed beside this python")
    assert help_text(script).startswith("usage: vutrain-export ")
