"""The benchmark harness: target verdicts on synthetic rows (pure Python), the Inf-CL
wrapper's reduction, the tile-config table, and ``python -m kernels.bench --quick``
(with ``--autotune``) on CPU under the Triton interpreter. Expected runtime: ~40 s.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kernels import tile_configs
from kernels.bench_targets import targets
from kernels.tile_configs import TileConfig

ROOT = Path(__file__).resolve().parent.parent
BIG = (32768, 32768, 768)
GATHERED = (4096, 32768, 768)


def _row(loss, provider, shape, mode, ms, extra=10.0, **kw):
    n, m, d = shape
    flops = (1 if n == m or loss == "sigmoid" else 2) * (2 if mode == "fwd" else 8) * n * m * d
    return {
        "loss": loss,
        "provider": provider,
        "N": n,
        "M": m,
        "D": d,
        "mode": mode,
        "ms": ms,
        "extra_mib": extra,
        "tflops": flops / (ms * 1e-3) / 1e12,
        **kw,
    }


def _good_rows():
    rows = []
    for shape in (BIG, GATHERED):
        for mode, ours_ms in (("fwd", 2.5), ("fwd+bwd", 10.0)):
            rows += [
                _row("clip", "ours", shape, mode, ours_ms),
                _row("clip", "compile", shape, mode, 20.0),
                _row("clip", "eager", shape, mode, 24.0),
                _row("clip", "inf_cl", shape, mode, 400.0),
                _row("sigmoid", "ours", shape, mode, ours_ms),
                _row("sigmoid", "eager", shape, mode, 30.0),
            ]
    return rows


def test_targets_pass_only_when_every_needed_row_is_measured_and_meets_it():
    good = targets(_good_rows(), 700.0)
    assert [v["verdict"] for v in good] == ["PASS"] * 6, good
    # 8 * 32768^2 * 768 flops in 10 ms = 660 TFLOP/s = 94 % of 700.
    assert "94%" in good[0]["detail"]


@pytest.mark.parametrize(
    "change,failing",
    [
        (
            lambda rows: [
                r for r in rows if not (r["provider"] == "ours" and r["loss"] == "clip" and r["N"] == 4096)
            ],
            [3],
        ),  # ours missing at a benchmarked gathered shape: "no slower than compile" fails
        (
            lambda rows: [
                dict(r, error="OOM") if r["provider"] == "ours" and r["loss"] == "clip" else r for r in rows
            ],
            [0, 1, 2, 3],
        ),  # ours errored everywhere
        (
            lambda rows: [
                _row(r["loss"], "ours", (r["N"], r["M"], r["D"]), r["mode"], 25.0)
                if r["provider"] == "ours" and r["mode"] == "fwd+bwd"
                else r
                for r in rows
            ],
            [0, 3],
        ),  # slower than compile (25 > 20 ms) and under 55 % of dense; 16x inf_cl still passes
        (lambda rows: [dict(r, extra_mib=100.0) if r["provider"] == "ours" else r for r in rows], [1, 5]),
        (lambda rows: [r for r in rows if r["provider"] != "inf_cl"], [2]),  # inf_cl not measured
        (lambda rows: [r for r in rows if r["provider"] != "compile"], [3]),  # no baseline: cannot claim it
        (lambda rows: [], [0, 1, 2, 3, 4, 5]),  # today's bug: no rows at all must not read as success
        (
            lambda rows: [r for r in rows if not (r["provider"] == "compile" and r["N"] == 4096)],
            [3],
        ),  # a compile row missing at a shape ours ran (a sweep cut short): it passed before
        (
            lambda rows: [
                dict(r, error="BackendCompilerFailed: inductor") if r["provider"] == "compile" else r
                for r in rows
            ],
            [3],
        ),  # a compile baseline that crashed proves nothing (it counted as ours winning before)
    ],
)
def test_targets_fail_on_missing_errored_or_missed(change, failing):
    verdicts = targets(change(_good_rows()), 700.0)
    assert [i for i, v in enumerate(verdicts) if v["verdict"] == "FAIL"] == failing, verdicts


def test_baseline_out_of_memory_is_not_measured_and_dense_is_needed():
    # Until 2026-12-07 a compile baseline out of memory counted as ours winning (PASS), while an
    # inf_cl one failed its target: no ratio either way (test_review_bench12.py).
    rows = [dict(r, error="OOM") if r["provider"] == "compile" else r for r in _good_rows()]
    assert targets(rows, 700.0)[3]["verdict"] == "NOT MEASURED"
    assert targets(_good_rows(), None)[0]["verdict"] == "NOT MEASURED"


def test_inf_cl_wrapper_takes_the_mean_of_per_row_losses(monkeypatch):
    # inf_cl's cal_flash_loss returns per-row losses in some versions; the wrapper must
    # reduce them like ours (the mean), or its fwd+bwd rows fail (backward of a vector).
    import torch.nn.functional as F

    from kernels import bench

    def cal_flash_loss(q, k, labels, scale):
        return F.cross_entropy(scale * q @ k.T, labels, reduction="none")

    monkeypatch.setitem(sys.modules, "inf_cl", types.SimpleNamespace(cal_flash_loss=cal_flash_loss))
    args = bench.make_inputs(8, 24, 16, torch.float32, torch.device("cpu"))
    ours = bench.inf_cl_loss_fn()(*args)
    assert ours.dim() == 0
    torch.testing.assert_close(ours, bench.eager_loss(*args))
    ours.backward()


def test_compile_baseline_compiles_afresh_for_every_case(monkeypatch):
    """One torch.compile reused across shapes goes dynamic (and eager past the recompile limit):
    every `compile` case starts from a reset dynamo, the other providers leave it alone."""
    from kernels import bench

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cpu = torch.device("cpu")
    for provider in ("eager", "compile", "compile"):
        row = bench.run_case("clip", provider, bench.eager_loss, (8, 8, 16), "fwd", torch.float32, cpu, 1)
        assert "error" not in row, row
    assert len(resets) == 2


@pytest.mark.parametrize("arch", tile_configs.ARCHES)
def test_every_chosen_config_fits_shared_memory_in_fp32_and_bf16(arch, monkeypatch):
    """The tables are sized for 16-bit inputs; fp32 (TF32) features through the square best config
    would ask sm_90 for 288 KiB and fail at launch with OutOfResources."""
    monkeypatch.delenv(tile_configs.TUNED_ENV, raising=False)
    for kind in tile_configs.KINDS:
        for n, m, d in [(32768, 32768, 768), (4096, 32768, 768), (512, 512, 1024), (300, 300, 24)]:
            bf16 = tile_configs.choose(arch, kind, n, m, d, element_size=2)
            assert bf16 == tile_configs._fit_bd(tile_configs.lookup(arch, kind, n, m).config, d)  # as tuned
            fp32 = tile_configs.choose(arch, kind, n, m, d, element_size=4)
            assert tile_configs.shared_memory_bytes(fp32, 4) <= tile_configs.SHARED_MEMORY[arch]
            assert min(fp32.BM, fp32.BN, fp32.BD) >= 16  # tl.dot on a GPU
    square_fp32 = tile_configs.choose("sm_90", "ce_grad", 32768, 32768, 768, element_size=4)
    assert square_fp32 == TileConfig(128, 256, 32, 8, 3)


def test_tile_table_measured_entries_and_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv(tile_configs.TUNED_ENV, raising=False)
    big = tile_configs.lookup("sm_90", "ce_grad", 32768, 32768)
    assert big.config == TileConfig(128, 256, 64, 8, 3) and big.source.startswith("measured")
    gathered = tile_configs.lookup("sm_90", "ce_fwd", 4096, 32768)
    assert gathered.config == TileConfig(128, 128, 64, 8, 3) and gathered.source.startswith("measured")
    assert tile_configs.lookup("sm_80", "sig_grad", 512, 512).source.startswith("unmeasured")
    assert tile_configs.lookup("fallback", "ce_fwd", 100, 100).config.BD == 32
    assert (
        tile_configs.select("ce_fwd", 4096, 4096, 768, torch.device("cpu"), True)
        == tile_configs.INTERPRET_CONFIG
    )
    assert tile_configs._fit_bd(TileConfig(128, 128, 64, 8, 3), 24).BD == 32  # D = 24: no 64-wide slab
    # A tuned file wins over the built-in table; a malformed one is a clear error.
    path = tmp_path / "tuned.json"
    tuned = tile_configs.Entry(TileConfig(64, 128, 64, 4, 3), "tuned: test")
    tile_configs.write_tuned(path, {("sm_90", "ce_grad", "large"): tuned})
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(path))
    assert tile_configs.lookup("sm_90", "ce_grad", 32768, 32768) == tuned
    assert tile_configs.lookup("sm_90", "ce_fwd", 32768, 32768).source.startswith("measured")
    path.write_text("{not json")
    tile_configs.load_tuned.cache_clear()
    with pytest.raises(ValueError, match="--autotune"):
        tile_configs.lookup("sm_90", "ce_fwd", 32768, 32768)
    tile_configs.load_tuned.cache_clear()
    with tile_configs.forced("ce_fwd", TileConfig(16, 16, 16, 1, 1)):
        assert tile_configs.select("ce_fwd", 8, 8, 8, torch.device("cpu"), True).BM == 16
    assert tile_configs.select("ce_fwd", 8, 8, 8, torch.device("cpu"), True).BM == 32


def _bench(tmp_path, *extra):
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "kernels.bench", "--quick", "--reps", "1", "--out", str(tmp_path), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "bench_kernels.png").stat().st_size > 0
    return r, json.loads((tmp_path / "bench_kernels.json").read_text())


def test_bench_stopped_by_a_time_limit_still_writes_what_it_measured(tmp_path):
    """launch/gpu_bench.sh runs each step under `timeout` (SIGTERM): the JSON must survive it."""
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "kernels.bench", "--quick", "--reps", "20", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the first measured row: the run is under way
            if line.startswith("{"):
                break
        proc.terminate()
        assert proc.wait(timeout=120) == 128 + 15
    finally:
        proc.kill()
    result = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert result["rows"] and "dense_matmul_tflops_8192" in result
    assert result["partial"] is True  # a run cut short says so in its JSON


def test_exit_code_says_whether_every_case_ran():
    """The kernels step of launch/gpu_bench.sh exited 0 even when every case errored."""
    from kernels.bench import exit_code

    rows = [{"provider": "ours", "error": "OOM"}, {"provider": "inf_cl", "error": "not installed"}]
    assert exit_code({"partial": False, "rows": rows}) == 0
    assert exit_code({"partial": True, "rows": rows}) == 1
    assert exit_code({"partial": False, "rows": rows + [{"error": "CompilationError: x"}]}) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real sweep instead")
def test_bench_quick_writes_json_png_and_fails_unmeasured_targets(tmp_path):
    r, result = _bench(tmp_path)
    ours = [row for row in result["rows"] if row["provider"] == "ours"]
    assert ours and all("error" not in row and row["ms"] > 0 for row in ours), ours
    assert {(row["loss"], row["mode"]) for row in ours} == {
        (x, m) for x in ("clip", "sigmoid") for m in ("fwd", "fwd+bwd")
    }
    assert result["backend"] == "triton-interpreter"
    # No GPU rows at the target shapes: every verdict is FAIL, never a success by default.
    assert [v["verdict"] for v in result["targets"]] == ["FAIL"] * 6
    # Traceable: the command, the commit and the versions that made these figures.
    assert result["partial"] is False and result["command"].startswith("python -m kernels.bench --quick")
    assert result["commit"] and result["versions"]["torch"]
    assert result["versions"]["triton"]
    assert "| provider |" in r.stdout and "FAIL  clip fwd+bwd" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU autotunes for real")
def test_bench_autotune_writes_a_table_the_kernels_read(tmp_path):
    _, result = _bench(
        tmp_path,
        "--losses",
        "sigmoid",
        "--providers",
        "ours",
        "--modes",
        "fwd+bwd",
        "--shapes",
        "40x40x32",
        "--autotune",
        "--candidates",
        "32,32,32,4,1;16,16,16,1,1",
    )
    table = tile_configs.load_tuned(str(tmp_path / "tuned_configs.json"))
    assert set(table) == {("interpreter", "sig_fwd", "small"), ("interpreter", "sig_grad", "small")}
    timed = [e for e in result["autotune"]["log"] if "ms" in e]
    assert len(timed) == 4  # two candidates x (forward sweep, gradient sweep)
