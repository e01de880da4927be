"""Review of the kernel tools: compile_check's bad `--arch` is one usage line, never a compiler
abort; the Triton version tuned tables record and check is found also where torch ships Triton
under another distribution name."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch

from kernels import provenance, tile_configs
from kernels.tile_configs import Entry, TileConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["9", "95"])
def test_compile_check_refuses_an_arch_that_is_no_compute_capability_in_one_line(arch):
    """`--arch 9` (Hopper, typed as its major version) or a capability no GPU has reached LLVM as
    an unknown `sm_9`/`sm_95a` and aborted the process ("LLVM ERROR: Cannot select", exit 134)
    after pages of warnings; now it is argparse's usage error naming the valid arches, before
    anything compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", arch, "--kernels", "fwd"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "LLVM ERROR" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert f"--arch {arch}:" in errors[0] and "90 for H100" in errors[0] and "120" in errors[0]
    assert proc.stdout == ""


# ---- the Triton version of a tuned table where torch ships Triton as pytorch-triton* ----------

BUILT_IN = tile_configs.TABLE[("sm_90", "ce_grad", "large")].config
TUNED = TileConfig(64, 128, 64, 4, 3)


@pytest.fixture
def rocm_triton(tmp_path, monkeypatch):
    """Stands in for the installed distributions of a ROCm (or nightly) torch: Triton is there,
    under the name `pytorch-triton-rocm`, and no distribution is called `triton`."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "triton":
            raise importlib.metadata.PackageNotFoundError(name)
        return "3.2.0+gitabc" if name == "pytorch-triton-rocm" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(tmp_path / "tuned.json"))
    monkeypatch.setattr(tile_configs, "_SKIPPED", set())
    tile_configs.triton_version.cache_clear()
    tile_configs.load_tuned.cache_clear()
    yield tmp_path / "tuned.json"
    tile_configs.triton_version.cache_clear()
    tile_configs.load_tuned.cache_clear()


def test_triton_shipped_as_pytorch_triton_is_recorded_and_checked(rocm_triton, caplog):
    """ROCm and nightly torch wheels install Triton as `pytorch-triton-rocm` / `pytorch-triton`.
    Read as the `triton` distribution only, its version was None there: the bench JSON said triton
    null, autotune wrote rows without a Triton version, and a row tuned under another Triton applied
    anyway. Now the version is the installed one, and such a row gives way with one log line."""
    assert tile_configs.triton_version() == "3.2.0+gitabc"
    assert provenance.versions(("torch", "triton"))["triton"] == "3.2.0+gitabc"
    tile_configs.write_tuned(
        rocm_triton, {("sm_90", "ce_grad", "large"): Entry(TUNED, "tuned: test", "bfloat16", "3.1.0")}
    )
    caplog.set_level(logging.WARNING, logger=tile_configs.__name__)
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16).config == BUILT_IN
    (line,) = [r.getMessage() for r in caplog.records if r.name == tile_configs.__name__]
    assert "triton 3.1.0" in line and "triton 3.2.0+gitabc" in line
    # A row tuned under this very Triton still applies.
    tile_configs.write_tuned(
        rocm_triton, {("sm_90", "ce_grad", "large"): Entry(TUNED, "tuned: test", "bfloat16", "3.2.0+gitabc")}
    )
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16).config == TUNED
