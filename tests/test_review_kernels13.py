"""The shared-memory estimate that fits tile configs is never under what Triton compiles, and on
the cards whose pipeline was measured (A100, RTX 30xx, Jetson Orin, RTX 40xx/L4/L40S) it is what
Triton compiles.

It counted ``num_stages`` operand slabs everywhere (Hopper's wgmma pipeline); Ampere's cp.async
pipeline keeps ``num_stages - 1``, so A100/RTX 30xx configs were shrunk needlessly (128x256x64,
3 stages, bf16: 147456 B estimated, 98304 B compiled); sm_87/sm_89 compile to the same bytes and
were counted the larger way until 2026-12-07, so an RTX 4090 (99 KiB) shrank that config though it
fits. Compiles for sm_80/86/87/89/90 in one subprocess without a GPU (kernels.compile_check's
compile_kernel). Measured on a loaded 2-core machine (load 11-16): about 10 s (6 CPU-s) with Triton's
cache warm, about 3 min (83 CPU-s) cold; the Triton compiles themselves are the cost.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import tile_configs
from kernels.runtime import HAS_TRITON
from kernels.tile_configs import TileConfig, shared_memory_bytes

ROOT = Path(__file__).resolve().parent.parent

# (compute capability, dtype, kernels, configs): a grid over stages (1-4), tile shapes and BD.
GRID = [
    ("8.0", "bf16", "sig_fwd", ["128,256,64,8,3", "64,64,32,4,2", "128,128,64,8,1"]),
    ("8.6", "bf16", "grad", ["128,128,64,8,4", "64,128,128,4,2"]),
    ("8.0", "fp32", "sig_grad", ["128,256,64,8,3"]),
    ("9.0", "bf16", "fwd,sig_fwd", ["128,256,64,8,3", "64,64,32,4,2"]),
    ("9.0", "fp32", "sig_fwd", ["64,64,32,4,2"]),
    ("8.9", "bf16", "grad,sig_fwd", ["128,256,64,8,3", "128,128,64,8,4"]),
    ("8.9", "fp32", "fwd", ["64,128,128,4,2", "128,128,64,8,1"]),
    ("8.7", "bf16", "sig_grad", ["128,128,64,8,3"]),
]


# One Python compiles the whole grid: a `python -m kernels.compile_check` per row started torch and
# Triton 8 times, and its ptxas register report (2 CPU-s a kernel, 26 kernels) is never read here.
# The same compile_kernel the CLI calls, the same variants (fwd and grad with and without cols).
_COMPILE_GRID = """
import json, sys
from kernels.compile_check import compile_kernel
from kernels.tile_configs import TileConfig
for index, (capability, dtype, kernels, configs) in enumerate(json.loads(sys.argv[1])):
    for kind in kernels.split(","):
        for text in configs:
            cfg = TileConfig(*map(int, text.split(",")))
            for with_cols in (False, True) if kind in ("fwd", "grad") else (False,):
                k = compile_kernel(kind, dtype, with_cols, cfg, int(capability.replace(".", "")))
                row = {"grid": index, "kernel": kind, "config": cfg.as_list()}
                print(json.dumps({**row, "shared_bytes": k.metadata.shared}), flush=True)
"""


def _compile(grid: list) -> dict[int, list[dict]]:
    """Triton's compiled shared memory of every (kernel, config) of ``grid``, by grid row."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-c", _COMPILE_GRID, json.dumps(grid)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows: dict[int, list[dict]] = {index: [] for index in range(len(grid))}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row.pop("grid")].append(row)
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_estimate_is_never_under_the_compiled_shared_memory_and_exact_where_measured():
    table = []
    compiled_grid = _compile(GRID)
    for index, (capability, dtype, kernels, configs) in enumerate(GRID):
        rows = compiled_grid[index]
        assert len(rows) >= len(configs) * len(kernels.split(","))
        for r in rows:
            cfg, size = TileConfig(*r["config"]), 4 if dtype == "fp32" else 2
            compiled, before = r["shared_bytes"], shared_memory_bytes(cfg, size)
            after = shared_memory_bytes(cfg, size, capability)
            table.append((capability, dtype, r["kernel"], cfg.as_list(), before, after, compiled))
            # Never under: an under-estimate lets through a config that fails at launch.
            assert after >= compiled and before >= compiled, table[-1]
            # Exact for the Ampere pipeline and for sm_90's 16-bit wgmma pipeline; fp32 at "ieee"
            # precision on sm_90 compiles num_stages - 1 too, but TF32 (torch's "high") num_stages,
            # and the precision is torch's setting at launch: counted as the larger.
            if capability in tile_configs.AMPERE_PIPELINE or dtype == "bf16":
                assert after == compiled, table[-1]
            if capability in tile_configs.AMPERE_PIPELINE and cfg.num_stages > 1:
                assert before > compiled, table[-1]  # what shrank configs needlessly
    print("\n".join(map(str, table)))


def _gpu(monkeypatch, capability, hip=None, **props):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", hip)


def test_an_a100_launch_keeps_the_config_its_compiled_shared_memory_fits(monkeypatch):
    """fp32 features on an A100 (163 KiB): the table's 128x128x64, 3 stages compiles to 128 KiB, yet
    was estimated at 192 KiB and launched with BD halved. An unknown card keeps the larger count."""
    monkeypatch.delenv(tile_configs.TUNED_ENV, raising=False)
    monkeypatch.setattr(tile_configs, "TUNED_DEFAULT", ROOT / "no-such-tuned-table.json")
    cuda0 = torch.device("cuda", 0)
    _gpu(monkeypatch, (8, 0), shared_memory_per_block_optin=166_912)
    cfg = tile_configs.select("ce_grad", 32768, 32768, 768, cuda0, False, 4, torch.float32)
    assert cfg == TileConfig(128, 128, 64, 8, 3)
    assert shared_memory_bytes(cfg, 4, "8.0") == 131_072 <= 166_912
    # A card not compiled here (sm_120) and a ROCm card reporting 8.0-like numbers: the larger count.
    assert shared_memory_bytes(cfg, 4, "12.0") == 196_608 > 166_912
    _gpu(monkeypatch, (12, 0), shared_memory_per_block_optin=166_912)
    assert tile_configs.select("ce_grad", 32768, 32768, 768, cuda0, False, 4, torch.float32).BD == 32
    assert tile_configs.choose(
        "fallback", "ce_grad", 32768, 32768, 768, 4, 65_536, None, "8.0"
    ) == TileConfig(128, 128, 32, 8, 2)


def test_an_rtx_4090_keeps_an_a100_tuned_config_its_compiled_shared_memory_fits(monkeypatch, tmp_path):
    """An RTX 4090 / L40S (sm_89, 99 KiB) with a table tuned on an A100: 128x256x64, 3 stages, bf16
    compiles to 98304 B there (as on sm_80), yet was counted at 147456 B and launched with BD halved."""
    tuned = tmp_path / "tuned.json"
    square = TileConfig(128, 256, 64, 8, 3)
    tile_configs.write_tuned(tuned, {("sm_80", "ce_grad", "large"): tile_configs.Entry(square, "t")})
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(tuned))
    cuda0 = torch.device("cuda", 0)
    try:
        for capability in [(8, 9), (8, 7)]:  # RTX 40xx/L4/L40S, Jetson Orin
            _gpu(monkeypatch, capability, shared_memory_per_block_optin=101_376)
            cfg = tile_configs.select("ce_grad", 32768, 32768, 768, cuda0, False, 2, torch.bfloat16)
            assert cfg == square, capability
            assert shared_memory_bytes(cfg, 2, tile_configs.capability_of(cuda0)) == 98_304 <= 101_376
    finally:
        tile_configs.load_tuned.cache_clear()
