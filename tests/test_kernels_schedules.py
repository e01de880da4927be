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


def test_one_pass_accumulation_temporaries_stay_bounded(monkeypatch):
    # On a GPU the one-pass schedule adds 16-bit G.T @ Q chunks into its fp32 accumulator.
    # torch's CUDA addmm(out_dtype=fp32) can refuse an fp32 `acc` (its dtype check), and the fallback
    # must not allocate an fp32 product the size of the accumulator (up to 32 MiB more than
    # the documented 64 MiB bound). Meta tensors stand in for CUDA ones (no data, same ops).
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def cuda_addmm(*args, **kwargs):
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    monkeypatch.setattr(torch, "addmm", cuda_addmm)
    monkeypatch.setattr(gg, "ACCUMULATE_TEMP_BYTES", 4 * 64 * 16)  # 16 rows of D = 64 per product

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # In-place ops and views (row slices of the operands) allocate nothing.
            if not (func.is_view or func.__name__.split(".")[0].endswith("_")):
                sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                Largest.numel = max([Largest.numel, *sizes])
            return out

    acc = torch.zeros(256, 64, device="meta")
    a = torch.empty(512, 256, dtype=torch.bfloat16, device="meta").T  # G.T of a [chunk, short] G
    b = torch.empty(512, 64, dtype=torch.bfloat16, device="meta")
    with Largest():
        gg._addmm_fp32_(acc, a, b)
    assert 0 < Largest.numel <= 16 * 64, f"a temporary of {Largest.numel} elements (acc: {acc.numel()})"


@pytest.mark.parametrize("config", [[96, 128, 64, 8, 3], [128, 128, 8, 8, 3], [128, 128, 64, 6, 3]])
def test_tuned_table_rejects_configs_compiled_triton_cannot_build(tmp_path, config):
    # Non-power-of-two or sub-16 blocks run under the interpreter but fail to compile on the GPU;
    # a hand-edited table must fail when read, naming the file, not at the first launch.
    import json

    from kernels import tile_configs

    path = tmp_path / "tuned.json"
    row = {"arch": "sm_90", "kind": "ce_fwd", "shape_class": "small", "config": config}
    path.write_text(json.dumps({"entries": [row]}))
    tile_configs.load_tuned.cache_clear()
    try:
        with pytest.raises(ValueError, match="tuned.json"):
            tile_configs.load_tuned(str(path))
    finally:
        tile_configs.load_tuned.cache_clear()


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("n,m", [(37, 300), (300, 37), (130, 130)])
@pytest.mark.parametrize("schedule", ["single", "one_pass", "two_pass"])
def test_a_side_nobody_needs_costs_no_gemm(monkeypatch, n, m, schedule, need):
    # A locked tower's features need no gradient (ctx.needs_input_grad): its GEMMs are
    # skipped, so one side costs one N x M x D product in all (the tiles' partials, i.e.
    # the scale's gradient, are still made), and the wanted side stays exact.
    need_dq, need_dk = need
    d, bm = 24, 16
    gen = torch.Generator().manual_seed(n * m)
    q, k, g_full = (torch.randn(*s, generator=gen, dtype=torch.float32) for s in ((n, d), (m, d), (n, m)))
    monkeypatch.setattr(gg, "GRAD_WORKSPACE_BYTES", 4 * 48 * min(n, m) if schedule != "single" else 2**30)
    monkeypatch.setattr(gg, "ACCUMULATE_MIN_CHUNK", 1)
    monkeypatch.setenv(gg.SCHEDULE_ENV, "auto" if schedule == "single" else schedule)
    macs = []
    mm_into, addmm = gg._mm_into, gg._addmm_fp32_

    def counted(fn):
        def gemm(out, a, b):
            macs.append(a.shape[0] * a.shape[1] * b.shape[1])
            fn(out, a, b)

        return gemm

    monkeypatch.setattr(gg, "_mm_into", counted(mm_into))
    monkeypatch.setattr(gg, "_addmm_fp32_", counted(addmm))
    dq, dk, parts = gg.gradient_gemms(
        q, k, _writer(g_full, []), torch.tensor(1.0), bm, bm, need_dq=need_dq, need_dk=need_dk
    )
    assert (dq is None) != need_dq and (dk is None) != need_dk
    if need_dq:
        torch.testing.assert_close(dq, g_full @ k, rtol=1e-5, atol=1e-4)
    if need_dk:
        torch.testing.assert_close(dk, g_full.T @ q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts, g_full.sum().reshape(1), rtol=1e-5, atol=1e-3)
    assert sum(macs) == (need_dq + need_dk) * n * m * d, macs
