"""Review 12 of the benchmarks: a ratio target whose baseline could not run is NOT MEASURED (not a
pass, not a fail) for every target alike, and `vutrain.bench.run_one` ends its loader workers.

Real components: the verdicts over `kernels.bench` rows (pure Python), and the benchmark's real
Trainer in this process (one rank, gloo) with a real DataLoader worker process, seen via psutil.
"""

from __future__ import annotations

import psutil
import pytest
import torch
from test_kernels_bench import _good_rows

from kernels.bench import parse_shapes
from kernels.bench_targets import format_verdicts, targets

DENSE, INF_CL, NO_SLOWER_COMPILE, NO_SLOWER_EAGER = 0, 2, 3, 4


def _with_error(rows: list[dict], provider: str, error: str, loss: str = "clip", n: int | None = None):
    return [
        dict(r, error=error) if r["provider"] == provider and r["loss"] == loss and n in (None, r["N"]) else r
        for r in rows
    ]


@pytest.mark.parametrize("error", ["OOM", "not installed"])
def test_an_inf_cl_baseline_that_could_not_run_is_not_measured(error):
    """An inf_cl row out of memory FAILed ">= 2x faster than inf_cl", while a torch.compile row out
    of memory counted as ours winning "no slower than": the same fact judged both ways."""
    verdict = targets(_with_error(_good_rows(), "inf_cl", error), 700.0)[INF_CL]
    assert verdict["verdict"] == "NOT MEASURED", verdict
    assert f"inf_cl: {error}" in verdict["detail"] and "could not run" in verdict["detail"]


def test_a_compile_baseline_out_of_memory_is_not_a_pass_for_ours():
    verdicts = targets(_with_error(_good_rows(), "compile", "OOM"), 700.0)
    assert verdicts[NO_SLOWER_COMPILE]["verdict"] == "NOT MEASURED", verdicts[NO_SLOWER_COMPILE]
    # One shape out of memory, the other measured and passing: still not a pass, and both are named.
    one = targets(_with_error(_good_rows(), "compile", "OOM", n=4096), 700.0)[NO_SLOWER_COMPILE]
    assert one["verdict"] == "NOT MEASURED", one
    assert one["detail"].startswith("2 shape/mode pairs no slower; not measured"), one
    assert "4096x32768x768 fwd+bwd (compile: OOM)" in one["detail"], one
    # The sigmoid target's eager baseline follows the same rule.
    sig = targets(_with_error(_good_rows(), "eager", "OOM", loss="sigmoid"), 700.0)[NO_SLOWER_EAGER]
    assert sig["verdict"] == "NOT MEASURED", sig


def test_a_measured_miss_still_fails_beside_a_pair_not_measured():
    rows = _with_error(_good_rows(), "compile", "OOM", n=4096)
    rows = [
        dict(r, ms=50.0) if r["provider"] == "ours" and r["loss"] == "clip" and r["N"] == 32768 else r
        for r in rows
    ]
    verdict = targets(rows, 700.0)[NO_SLOWER_COMPILE]
    assert verdict["verdict"] == "FAIL", verdict
    assert "(50.000 vs 20.000 ms)" in verdict["detail"] and "not measured" in verdict["detail"], verdict


def test_a_crashed_or_missing_baseline_still_fails_and_the_dense_yardstick_is_not_measured():
    # A crash or a row the sweep never reached is a broken run (exit 1, or partial): FAIL as before.
    crashed = _with_error(_good_rows(), "inf_cl", "RuntimeError: boom")
    assert targets(crashed, 700.0)[INF_CL]["verdict"] == "FAIL"
    # The 55 % target is a ratio too: without the dense rate (a CPU run) it was a FAIL.
    dense = targets(_good_rows(), None)[DENSE]
    assert dense["verdict"] == "NOT MEASURED" and "dense matmul rate not measured" in dense["detail"]
    assert format_verdicts([dense]).startswith("NOT MEASURED  clip fwd+bwd at 32768x32768x768 >= 55%")


def test_run_one_ends_its_loader_workers(tiny_shards, tmp_path, single_process):
    """run_one never closed its stream: the loader worker processes of every configuration run in
    one process (as tests and notebooks do) lived until it exited."""
    from vutrain import bench

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    spec = dict(
        run_dir=str(tmp_path / "bench"), train_shards=tiny_shards["train_shards"], preset="tiny",
        precision="fp32", zero_stage=0, batch_size=4, grad_ckpt=False, warmup=0, steps=1, workers=1,
        loss_backend="torch",
    )  # fmt: skip
    row = bench.run_one(spec)
    assert row["samples_per_s"] > 0
    # The device the Trainer ran on: it was GPU 0's name whenever a GPU was visible (a CPU run on
    # a GPU machine, VUTRAIN_DEVICE=cpu, was recorded as the GPU's); here the CPU's either way.
    assert row["device"] == bench.device_name(torch.device("cpu")) and row["device"].startswith("CPU (")
    new = {p.pid for p in psutil.Process().children(recursive=True)} - before
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in new if psutil.pid_exists(pid)], timeout=30)
    assert not alive, f"loader workers still running after run_one returned: {alive}"


@pytest.mark.parametrize("text", ["32768x4096x768", "0x96x64", "96x96x0"])
def test_a_shape_no_case_can_run_is_one_line(text):
    """N > M (N and M swapped) or a zero ran as one error row per provider, whose message (a label
    offset out of range, a CE target out of bounds) did not name the shape."""
    with pytest.raises(SystemExit, match=r"N, M and D must be >= 1 and N <= M"):
        parse_shapes(f"96x96x64,{text}")
    assert parse_shapes("4096x32768x768,96x96x64") == [(4096, 32768, 768), (96, 96, 64)]
