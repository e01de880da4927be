"""Review of kernels/bench.py's memory figures (its CUDA path, run here on the CPU; the conftest
sets TRITON_INTERPRET)."""

from __future__ import annotations

import torch
import triton.testing

from kernels import bench


def test_memory_run_allocates_the_gradients_it_reports(monkeypatch):
    """On the H200 the gathered clip row read extra = -9.9 MiB: the warm-up call's gradients were
    still alive when the memory run's baseline was taken, so that run added into them in place and
    its peak held none of the gradients `grad_mib` then subtracted.

    No CUDA here: the allocator's counters are stood in for by the bytes of the leaves' live
    gradients (what a backward leaves allocated), the rest of `measure` runs as on a GPU.
    """
    img, txt, img_all, txt_all, scale, offset = bench.make_inputs(8, 32, 16, torch.float32, "cpu")
    leaves = [img, txt, img_all, txt_all, scale]

    def live_grad_bytes():
        return sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)

    peak = {"bytes": 0}

    def fn():
        out = bench.ours_loss(img, txt, img_all, txt_all, scale, offset)
        out.backward()
        peak["bytes"] = max(peak["bytes"], live_grad_bytes())
        return out

    def reset_peak():
        peak["bytes"] = live_grad_bytes()

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: reset_peak())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: live_grad_bytes())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["bytes"])
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: [1.0, 0.9, 1.1])

    row = bench.measure(fn, leaves, cuda=True, reps=1)
    assert row["grad_mib"] > 0
    assert row["peak_mib"] >= row["grad_mib"], row
    assert row["extra_mib"] >= 0, row
