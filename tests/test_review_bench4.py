"""Review 4 of the benchmarks: the open_clip comparison when its first vutrain configuration fails,
the tuned tile table with one entry per dtype, and gradcache_bench when a configuration fails.

Real components throughout: open_clip's own modules (loaded without its package __init__), real
Trainers on synthetic shards in one gloo process group, real autotune sweeps under the Triton
interpreter, real subprocesses of gradcache_bench.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from worker_ports import free_port

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from kernels import tile_configs
from kernels.tile_configs import Entry, TileConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (make test installs it)",
)


@needs_open_clip
def test_open_clip_trains_when_the_first_vutrain_configuration_fails(tmp_path, monkeypatch):
    """The first vutrain configuration's Trainer reads the pool of batches both sides train on.
    When it failed to build, every open_clip row, the baseline of every ratio, said
    "TypeError: CLIP() argument after ** must be a mapping, not NoneType". open_clip now trains
    on batches read by a Trainer built for that alone, the same pool the later vutrain
    configurations train on."""
    from vutrain import bench_compare as bc
    from vutrain.data.synthetic import write_synthetic
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    argv = "--compare open_clip --preset tiny --precision fp32 --batch-sizes 4 --zero-stages 2"
    argv += " --loss-backends nope --grad-ckpt off --steps 1 --warmup 0 --pool 8 --max-batch 0"
    args = bc.parse_args(argv.split())
    data = write_synthetic(
        str(tmp_path / "data"), num_samples=16, shard_size=16, image_size=32, val_samples=0
    )
    info = resolve_dist_env()
    init_distributed(info)
    try:
        bench = bc.Bench(args, info, str(tmp_path / "run"), data["train_shards"])
        measured: list[dict] = []
        for variant in bc.variants(args):
            bench.speed(variant, measured)
    finally:
        cleanup()
    ours, theirs = measured
    assert ours["variant"] == "vutrain z2 nope" and "loss.backend='nope'" in ours["error"]
    assert theirs["variant"] == "open_clip" and "error" not in theirs, theirs
    assert theirs["samples_per_s"] > 0
    assert bench.batches.pool["input_ids"].shape[0] == 8  # the pool of --pool samples


def _tune(out, dtype, candidate):
    from kernels.bench_autotune import autotune

    return autotune([(32, 32, 32)], ["sigmoid"], dtype, torch.device("cpu"), out, candidate, 1)


@pytest.fixture
def table_env(tmp_path, monkeypatch):
    path = tmp_path / "tuned_configs.json"
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(path))
    monkeypatch.setattr(tile_configs, "_SKIPPED", set())
    tile_configs.load_tuned.cache_clear()
    yield path
    tile_configs.load_tuned.cache_clear()


def test_autotune_for_a_second_dtype_keeps_the_first_dtypes_entries(table_env):
    """The tuned table kept one entry per (arch, kernel, shape class): a sweep for fp32 after one
    for bf16 replaced the bf16 winners, and every bf16 launch went back to the built-in config.
    Both dtypes' winners are now kept and each launch takes its own dtype's."""
    bf16, fp32 = TileConfig(16, 16, 16, 1, 1), TileConfig(32, 32, 32, 4, 1)
    _tune(table_env.parent, torch.bfloat16, ",".join(map(str, bf16.as_list())))
    _tune(table_env.parent, torch.float32, ",".join(map(str, fp32.as_list())))
    rows = json.loads(table_env.read_text())["entries"]
    assert sorted((r["kind"], r["dtype"]) for r in rows) == [
        ("sig_fwd", "bfloat16"),
        ("sig_fwd", "float32"),
        ("sig_grad", "bfloat16"),
        ("sig_grad", "float32"),
    ]
    tile_configs.load_tuned.cache_clear()
    for kind in ("sig_fwd", "sig_grad"):
        assert tile_configs.lookup("interpreter", kind, 32, 32, torch.bfloat16).config == bf16
        assert tile_configs.lookup("interpreter", kind, 32, 32, torch.float32).config == fp32
    # Re-tuning one dtype replaces that dtype's entry alone.
    again = TileConfig(32, 32, 16, 2, 1)
    _tune(table_env.parent, torch.bfloat16, ",".join(map(str, again.as_list())))
    tile_configs.load_tuned.cache_clear()
    assert len(json.loads(table_env.read_text())["entries"]) == 4
    assert tile_configs.lookup("interpreter", "sig_fwd", 32, 32, torch.bfloat16).config == again
    assert tile_configs.lookup("interpreter", "sig_fwd", 32, 32, torch.float32).config == fp32


def test_a_table_with_an_entry_per_dtype_reads_back_and_old_entries_still_apply(table_env):
    """write_tuned/load_tuned round-trip two dtypes at one location (the file kept only the last
    one read); an entry that records no dtype (tables before 2026-12) still serves the dtypes
    that have none of their own."""
    key = ("sm_90", "ce_grad", "large")
    bf16 = Entry(TileConfig(64, 128, 64, 4, 3), "t", "bfloat16", tile_configs.triton_version())
    fp32 = Entry(TileConfig(64, 64, 32, 4, 2), "t", "float32", tile_configs.triton_version())
    old = Entry(TileConfig(128, 64, 64, 8, 3), "t")
    tile_configs.write_tuned(table_env, {key + ("bfloat16",): bf16, key + ("float32",): fp32})
    table = tile_configs.load_tuned(str(table_env))
    assert set(table.rows.values()) == {bf16, fp32} and set(table) == {key}
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16) == bf16
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.float32) == fp32
    tile_configs.write_tuned(table_env, {key + ("float32",): fp32, key + (None,): old})
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.float32) == fp32
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768, torch.bfloat16) == old


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a configuration that fails: cuda on a CPU host")
def test_gradcache_bench_records_a_failed_configuration_and_goes_on():
    """A configuration that failed (on a GPU: the plain step out of memory, the case GradCache is
    measured for) ended the run at once with no JSON line: every row measured before it, and
    the configurations after it, were lost. Each failure is now a row with its error, the
    others still run, and the last line holds every row; a failure other than out-of-memory
    still makes the exit code 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "vutrain.gradcache_bench", "--batches", "2", "--micro", "1"]
        + ["--device", "cuda"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["global_batch"], r["mode"], r["micro"]) for r in rows] == [
        (2, "plain", 2),
        (2, "gradcache", 1),
    ]
    assert all(r["error"] and r["oom"] is False for r in rows), rows
    assert "2     plain  failed: " in proc.stdout
