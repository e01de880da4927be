"""The backward's GEMM schedules (kernels.gradient_gemms) in plain torch on CPU: every
schedule gives dQ = G @ K, dK = G.T @ Q and the partial sums of the whole G, and no
workspace chunk exceeds its byte bound. G comes from a dense torch tile writer here (the
Triton writers are tested through the ops). Expected runtime: ~2 s.
"""

import pytest
import torch

import kernels.gradient_gemms as gg


def _writer(g_full, chunks):
    def write(r0, r1, c0, c1, out, out_scale):
        chunks.append(out.numel() * out.element_size())
        out.copy_(g_full[r0:r1, c0:c1] * out_scale)
        return g_full[r0:r1, c0:c1].sum().reshape(1, 1)

    return write


@pytest.mark.parametrize("n,m", [(37, 300), (300, 37), (130, 130)])
@pytest.mark.parametrize("schedule", ["single", "one_pass", "two_pass"])
def test_every_schedule_is_exact_and_bounded(monkeypatch, n, m, schedule):
    d, bm = 24, 16
    gen = torch.Generator().manual_seed(n + m)
    q, k, g_full = (torch.randn(*s, generator=gen, dtype=torch.float32) for s in ((n, d), (m, d), (n, m)))
    cap = 4 * 48 * min(n, m)  # 48 rows (columns) of the longer side per chunk: several chunks
    monkeypatch.setattr(gg, "GRAD_WORKSPACE_BYTES", cap if schedule != "single" else 2**30)
    monkeypatch.setattr(gg, "ACCUMULATE_MIN_CHUNK", 1)
    monkeypatch.setenv(gg.SCHEDULE_ENV, "auto" if schedule == "single" else schedule)
    assert gg.choose_schedule(n, m, d, torch.float32, bm, bm)[0] == schedule
    chunks = []
    dq, dk, parts = gg.gradient_gemms(q, k, _writer(g_full, chunks), torch.tensor(1.0), bm, bm)
    torch.testing.assert_close(dq, g_full @ k, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dk, g_full.T @ q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts, g_full.sum().reshape(1), rtol=1e-5, atol=1e-3)
    if schedule != "single":
        # A chunk is never under one tile block, whatever the cap.
        assert len(chunks) > 2 and max(chunks) <= max(cap, 4 * bm * max(n, m)), chunks


def test_auto_prefers_one_pass_only_when_the_accumulator_fits(monkeypatch):
    monkeypatch.delenv(gg.SCHEDULE_ENV, raising=False)
    bf16 = torch.bfloat16
    # The shapes with the default 32 MiB workspace and 32 MiB accumulator.
    assert gg.choose_schedule(32768, 32768, 768, bf16, 128, 256)[0] == "two_pass"  # 96 MiB buffer
    assert gg.choose_schedule(4096, 32768, 768, bf16, 128, 128)[0] == "one_pass"  # 12 MiB buffer
    assert gg.choose_schedule(16384, 16384, 512, bf16, 128, 128)[0] == "one_pass"  # 32 MiB buffer
    assert gg.choose_schedule(16384, 16384, 768, bf16, 128, 128)[0] == "two_pass"  # 48 MiB buffer
    assert gg.choose_schedule(512, 512, 768, bf16, 128, 128)[0] == "single"
    monkeypatch.setenv(gg.SCHEDULE_ENV, "fastest")
    with pytest.raises(ValueError, match="one_pass"):
        gg.choose_schedule(512, 512, 768, bf16, 128, 128)
