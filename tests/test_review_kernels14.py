"""The shared-memory estimate counts what the gradient kernels need after their loop and follows the
fp32 ``tl.dot`` precision of the launch.

The gradient kernels store their [BM, BN] tile through a layout conversion in shared memory: at
128x128x32, 2 stages, bf16 on an A100 that is 32768 B where the operand slabs count 16384 B, so the
estimate was under the compiled size. On an H100, exact fp32 ("ieee", torch's default) dots keep
``num_stages - 1`` slabs, not the ``num_stages`` of TF32, so fp32 launches there were shrunk to BD = 32
though BD = 64 fits. Compiles a few configs for sm_80/sm_90 without a GPU (kernels.compile_check).
Expected runtime: ~30 s on 2 idle CPU cores.
"""

import pytest
import torch
from test_review_kernels13 import ROOT, _compile, _gpu

from kernels import runtime, tile_configs
from kernels.runtime import HAS_TRITON
from kernels.tile_configs import TileConfig, shared_memory_bytes

_KIND = {"fwd": "ce_fwd", "grad": "ce_grad", "sig_fwd": "sig_fwd", "sig_grad": "sig_grad"}
# (compute capability, dtype, kernels, configs, compiled bytes each row must have): fp32 compiles
# at "ieee", compile_check's default and what a launch runs under torch's default precision.
CASES = [
    ("8.0", "bf16", "grad,sig_grad", ["128,128,32,8,2"], 32_768),  # the tile store: 2x the slabs
    ("9.0", "bf16", "sig_grad", ["128,128,16,8,1"], 32_768),  # wgmma: 4x the slabs
    ("9.0", "fp32", "sig_fwd,sig_grad", ["64,64,32,4,2"], 16_384),  # ieee: one slab, not two
]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_estimate_is_the_compiled_size_of_gradient_tiles_and_exact_fp32():
    by_case = _compile([list(case[:4]) for case in CASES])  # one Python compiles every case
    compiled = [by_case[index] for index in range(len(CASES))]
    for (capability, dtype, kernels, _, expected), rows in zip(CASES, compiled):
        assert {r["kernel"] for r in rows} == set(kernels.split(","))
        for r in rows:
            cfg, size = TileConfig(*r["config"]), 4 if dtype == "fp32" else 2
            precision = "ieee" if dtype == "fp32" else "tf32"
            estimate = shared_memory_bytes(cfg, size, capability, _KIND[r["kernel"]], precision)
            row = (capability, dtype, r["kernel"], cfg.as_list(), estimate, r["shared_bytes"])
            assert r["shared_bytes"] == expected, row
            assert estimate == r["shared_bytes"], row  # never under, and not over either


def test_an_h100_fp32_launch_fits_the_slabs_of_its_own_precision(monkeypatch):
    """fp32 features at torch's default precision on an H100: the square config, 128x256x64, 3
    stages, compiles to 196608 B (two slabs) and fits 227 KiB, yet was counted at three slabs
    (294912 B) and launched with BD halved. Under TF32 ("high") it does take three: BD = 32."""
    monkeypatch.delenv(tile_configs.TUNED_ENV, raising=False)
    monkeypatch.setattr(tile_configs, "TUNED_DEFAULT", ROOT / "no-such-tuned-table.json")
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    _gpu(monkeypatch, (9, 0), shared_memory_per_block_optin=232_448)
    fp32 = torch.empty(1, 1, dtype=torch.float32, device="meta")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert runtime.tile_config("ce_grad", fp32, 32768, 32768, 768) == TileConfig(128, 256, 64, 8, 3)
        torch.set_float32_matmul_precision("high")
        assert runtime.tile_config("ce_grad", fp32, 32768, 32768, 768) == TileConfig(128, 256, 32, 8, 3)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_gradient_tile_over_the_limit_shrinks_the_tile_not_its_slabs():
    """256x256 fp32 TF32 on an H100: the tile store alone takes 256 KiB (Triton converts the whole
    tile on sm_90), over 227 KiB however thin the slabs; halving BD kept the tile and the launch
    failed. The forward kernels store row vectors: their tile stays."""
    big, limit = TileConfig(256, 256, 64, 8, 3), 232_448
    grad = tile_configs.fit_shared_memory(big, 4, limit, "9.0", "sig_grad", "tf32")
    assert grad == TileConfig(128, 256, 32, 8, 3)
    assert shared_memory_bytes(grad, 4, "9.0", "sig_grad", "tf32") <= limit
    fwd = tile_configs.fit_shared_memory(big, 4, limit, "9.0", "sig_fwd", "tf32")
    assert fwd == TileConfig(256, 256, 32, 8, 3)
    # A launch fits by its kind: the table's gradient configs on an A100 keep their slabs.
    assert tile_configs.choose("sm_80", "sig_grad", 32768, 32768, 768, 2, None, None, "8.0") == (
        TileConfig(128, 128, 64, 8, 3)
    )
