"""Review of the open_clip comparison's verdicts (vutrain/bench_report.py)."""

from __future__ import annotations

from vutrain.bench_report import judge_targets

TARGET = "largest batch >= 2.0x open_clip's"


def _largest(variant, side, batch, ckpt=False, **flags):
    return {"variant": variant, "side": side, "grad_ckpt": ckpt, "largest_batch": batch, **flags}


def test_largest_batch_is_not_failed_while_another_vutrain_search_was_cut_short():
    """launch/gpu_bench.sh searches the checkpointed configuration last, under --deadline-min: a
    finished search below 2x must not FAIL the target while that one stopped at a lower bound or
    was skipped (its true largest batch may be far above the 2x)."""
    base = _largest("open_clip", "open_clip", 1000)
    finished = _largest("vutrain z2 torch", "vutrain", 1200)
    stopped = _largest("vutrain z2 triton ckpt", "vutrain", 1024, ckpt=True, stopped=True)
    skipped = {"variant": "vutrain z2 triton ckpt", "side": "vutrain", "grad_ckpt": True, "skipped": "x"}

    for unfinished in (stopped, skipped, dict(stopped, stopped=False, error="RuntimeError: y")):
        got = {t["target"]: t for t in judge_targets([], [base, finished, unfinished], on_gpu=True)}
        assert got[TARGET]["result"].startswith("UNDECIDED (vutrain's search was cut short"), unfinished
        assert "vutrain z2 triton ckpt" in got[TARGET]["result"]
        assert (got[TARGET]["value"], got[TARGET]["by"]) == (1.2, "vutrain z2 torch")

    # Every vutrain search finished: the same figures are a FAIL.
    done = _largest("vutrain z2 triton ckpt", "vutrain", 1100, ckpt=True)
    got = {t["target"]: t["result"] for t in judge_targets([], [base, finished, done], on_gpu=True)}
    assert got[TARGET] == "FAIL"
