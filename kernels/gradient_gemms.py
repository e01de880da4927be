"""From logit-gradient tiles to ``dQ`` and ``dK``: the backward's schedules, shared by
the softmax (``grad_backward``) and the sigmoid (``sigmoid_loss``) losses.

A loss's Triton kernel recomputes score tiles and writes ``G = s * dL/dS`` (times an
exact power-of-two ``out_scale``) for a block of rows x columns into a bounded
workspace; cuBLAS turns each chunk into gradients: ``dQ = G @ K``, ``dK = G.T @ Q``.
The workspace holds the input dtype for 16-bit inputs, so every gradient GEMM runs on
tensor cores (fp16 gets a power-of-two pre-scale, see ``workspace_scale``); fp32 for
fp32 inputs.

Schedules, chosen by ``choose_schedule`` (override: ``KERNELS_BACKWARD_SCHEDULE``):
- ``single``: all of G fits the workspace; one recompute, two GEMMs.
- ``one_pass``: the workspace spans the shorter side and a chunk of the longer one.
  Each tile is recomputed once (8NMD flops in all); the long side's gradient is one
  complete GEMM per chunk, the short side's is accumulated over the chunks, in a fixed
  order, into an fp32 ``[short, D]`` buffer (deterministic: no atomics). Applies when
  that buffer fits ``ONE_PASS_ACCUMULATOR_BYTES`` and chunks are at least
  ``ACCUMULATE_MIN_CHUNK`` long (a shorter chunk makes the accumulating GEMM stream the
  fp32 buffer more than it computes: read + write ``8 * short * D`` bytes per
  ``2 * chunk * short * D`` flops).
- ``two_pass``: otherwise (large square problems: at 32768 x 32768 x 768 the fp32
  buffer alone would be 96 MiB and chunks are 512 rows): dQ from row chunks, then dK
  from column chunks, each a complete GEMM; 10NMD flops, no buffer.

Why not one pass everywhere: a deterministic one-pass backward must carry one side's
gradient across the whole pass in more than 16 bits, i.e. an fp32 ``[min(N, M), D]``
buffer (or per-row-block partials, which are larger still), and at N = M = 32768,
D = 768 that alone exceeds the 64 MiB bound. Keeping ``dQ`` or ``dK`` in registers
instead (FlashAttention-style) needs a ``[BM, D]`` fp32 accumulator per program, which
fits only for D <= ~256, below CLIP's 512-1024. Which schedule is faster at a given
shape is for the GPU to say: ``python -m kernels.bench --backward-schedule one_pass``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

# Bound on the gradient workspace (one chunk of G).
GRAD_WORKSPACE_BYTES = 32 * 2**20
# Bound on the one-pass schedule's fp32 [short side, D] accumulator: with the workspace,
# the backward's extra memory stays <= 64 MiB (the bound) on every schedule.
ONE_PASS_ACCUMULATOR_BYTES = 32 * 2**20
# Bound on the fp32 product temporaries of the one-pass accumulation (see _addmm_fp32_).
ACCUMULATE_TEMP_BYTES = 4 * 2**20
# Shortest long-side chunk for the one-pass schedule (see the module docstring).
ACCUMULATE_MIN_CHUNK = 1024
SCHEDULE_ENV = "KERNELS_BACKWARD_SCHEDULE"
SCHEDULES = ("auto", "single", "one_pass", "two_pass")
# fp16 workspace: scaled so that any GEMM output stays below this (fp16 max is 65504).
_FP16_OUTPUT_BOUND = 2.0**14

# write_tiles(r0, r1, c0, c1, out, out_scale) -> per-tile partials [tiles, P] (fp32):
# writes G for rows r0:r1 x columns c0:c1 into `out` [r1 - r0, c1 - c0].
TileWriter = Callable[[int, int, int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """The input dtype for 16-bit inputs (tensor-core GEMMs), fp32 otherwise."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def workspace_scale(q: torch.Tensor, k: torch.Tensor, g_bound: torch.Tensor) -> torch.Tensor:
    """0-dim fp32 power of two by which G is multiplied before it is stored.

    1 for bf16 and fp32 (fp32's exponent range). For fp16, G = s * g * (P - onehot) is
    tiny (g = 1/N: ~3e-8 at N = 32768, s = 1) and would fall into fp16's subnormals or
    flush to zero, so it is lifted until ``max |G| <= 1`` while keeping every GEMM output
    (a sum of at most max(N, M) products of G with feature entries) below 2^14.
    g_bound: 0-dim tensor bounding ``|G| / out_scale``. Computed on the device: no sync.
    """
    one = torch.ones((), dtype=torch.float32, device=q.device)
    if q.dtype != torch.float16:
        return one
    longest = max(q.shape[0], k.shape[0])
    x_max = torch.maximum(q.abs().amax(), k.abs().amax()).float().clamp_min(1e-30)
    bound = g_bound.float().clamp_min(1e-30)
    target = torch.minimum(1.0 / bound, _FP16_OUTPUT_BOUND / (bound * longest * x_max))
    return torch.exp2(torch.floor(torch.log2(target)).clamp(-60, 60))


def choose_schedule(n: int, m: int, d: int, g_dtype: torch.dtype, bm: int, bn: int) -> tuple[str, int]:
    """``(schedule, chunk)`` for an N x M x D backward; chunk: rows (or columns) per chunk
    of the longer side, each chunk spanning all of the shorter side (``two_pass`` sizes
    its two passes' chunks itself)."""
    forced = os.environ.get(SCHEDULE_ENV, "auto") or "auto"
    if forced not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV}={forced!r}; choose one of {', '.join(SCHEDULES)}")
    by_rows = n >= m
    long_len, short_len = (n, m) if by_rows else (m, n)
    chunk = min(long_len, _chunk_len(short_len, g_dtype, bm if by_rows else bn))
    acc_bytes = 4 * short_len * d
    if forced == "two_pass":
        return "two_pass", chunk
    if chunk >= long_len:
        return "single", chunk
    if forced == "one_pass" or (acc_bytes <= ONE_PASS_ACCUMULATOR_BYTES and chunk >= ACCUMULATE_MIN_CHUNK):
        return "one_pass", chunk
    return "two_pass", chunk


def _chunk_len(other_len: int, g_dtype: torch.dtype, block: int) -> int:
    """Rows (or columns) per workspace chunk when the chunk spans ``other_len``."""
    fit = GRAD_WORKSPACE_BYTES // (other_len * (torch.finfo(g_dtype).bits // 8))
    return max(block, fit // block * block)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation and one rounding to ``out``'s dtype."""
    if a.is_cuda and a.dtype == out.dtype:
        torch.mm(a, b, out=out)  # cuBLAS accumulates 16-bit GEMMs in fp32
    else:
        # Exact fp32 (CPU, the interpreter): also when backward() runs under an autocast block
        # the forward was outside of, which turned this GEMM to bf16 (3e-3 off, not 2e-6). Only
        # where autocast exists: torch.autocast("meta") raises (the launch-grid tests use meta).
        autocasts = a.device.type in ("cpu", "cuda")
        with torch.autocast(a.device.type, enabled=False) if autocasts else contextlib.nullcontext():
            out.copy_(torch.mm(a.float(), b.float()))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` without an fp32 copy of the 16-bit operands on a GPU."""
    if a.device.type != "cpu" and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        # torch without addmm(out_dtype=), or whose CUDA kernel wants `acc` in the 16-bit dtype
        # ("self and mat2 must have the same dtype" in the CUDA sources read; version not pinned).
        except (RuntimeError, TypeError):
            pass
        try:
            # A few rows of fp32 products at a time: one product the size of `acc` would add
            # ONE_PASS_ACCUMULATOR_BYTES to the backward's extra memory (96 MiB, not 64).
            step = max(1, ACCUMULATE_TEMP_BYTES // (4 * acc.shape[1]))
            for r0 in range(0, acc.shape[0], step):
                acc[r0 : r0 + step] += torch.mm(a[r0 : r0 + step], b, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=): fails at the first step
            pass
    acc.addmm_(a.float(), b.float())


def gradient_gemms(
    q: torch.Tensor,
    k: torch.Tensor,
    write_tiles: TileWriter,
    g_bound: torch.Tensor,
    bm: int,
    bn: int,
    *,
    need_dq: bool = True,
    need_dk: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``dq`` [N, D], ``dk`` [M, D] (inputs' dtypes) and the sum of the per-tile partials [P].

    q: [N, D], k: [M, D] contiguous; write_tiles: the loss's tile kernel (``TileWriter``);
    g_bound: 0-dim tensor bounding |G| (for the fp16 pre-scale); bm, bn: its tile sizes.
    need_dq / need_dk: False for a side autograd does not want (``ctx.needs_input_grad``,
    e.g. a locked tower's features): its GEMMs (and, for the two-pass schedule, its pass)
    are skipped and None is returned in its place: 4NMD flops instead of 6-10. With
    neither, only the tiles and their partials (the scale's gradient) are computed.
    """
    n, d = q.shape
    m = k.shape[0]
    g_dtype = workspace_dtype(q.dtype)
    out_scale = workspace_scale(q, k, g_bound)
    schedule, chunk = choose_schedule(n, m, d, g_dtype, bm, bn)
    dq = torch.empty_like(q) if need_dq else None
    dk = torch.empty_like(k) if need_dk else None
    if schedule == "two_pass":  # each pass sizes its own chunks: rows span M, columns span N
        parts = []
        if need_dq or not need_dk:  # without dq, the rows pass still makes the partials
            rows_chunk = min(n, _chunk_len(m, g_dtype, bm))
            parts = _rows_pass(q, k, dq, write_tiles, out_scale, g_dtype, rows_chunk)
        if need_dk:
            cols_chunk = min(m, _chunk_len(n, g_dtype, bn))
            cols_parts = _cols_pass(q, k, dk, write_tiles, out_scale, g_dtype, cols_chunk)
            parts = parts or cols_parts  # both passes: the same partials twice; keep one
    else:
        parts = _one_pass(q, k, dq, dk, write_tiles, out_scale, g_dtype, chunk)
    if q.dtype == torch.float16:  # undo the exact power-of-two pre-scale
        inv = 1.0 / out_scale
        for grad in (dq, dk):
            if grad is not None:
                grad.mul_(inv)
    return dq, dk, torch.cat(parts).sum(0)


def _one_pass(q, k, dq, dk, write_tiles, out_scale, g_dtype, chunk) -> list[torch.Tensor]:
    """``single`` and ``one_pass``: chunks of the longer side, each tile recomputed once.
    ``dq`` or ``dk`` None: that side's GEMMs (and accumulator) are skipped."""
    n, d = q.shape
    m = k.shape[0]
    by_rows = n >= m
    long_len, short_len = (n, m) if by_rows else (m, n)
    long_grad, short_grad = (dq, dk) if by_rows else (dk, dq)
    single = chunk >= long_len
    acc = None
    if not single and short_grad is not None:
        acc = torch.zeros(short_len, d, dtype=torch.float32, device=q.device)
    workspace = torch.empty(chunk * short_len, dtype=g_dtype, device=q.device)
    parts = []
    for s0 in range(0, long_len, chunk):
        s1 = min(s0 + chunk, long_len)
        if by_rows:  # G = [rows s0:s1, all M]: long side Q, short side K
            g = workspace[: (s1 - s0) * m].view(s1 - s0, m)
            parts.append(write_tiles(s0, s1, 0, m, g, out_scale))
            g_long, long_op, short_op = g, k, q[s0:s1]
        else:  # G = [all N, columns s0:s1]: long side K, short side Q
            g = workspace[: n * (s1 - s0)].view(n, s1 - s0)
            parts.append(write_tiles(0, n, s0, s1, g, out_scale))
            g_long, long_op, short_op = g.T, q, k[s0:s1]
        if long_grad is not None:
            _mm_into(long_grad[s0:s1], g_long, long_op)
        if short_grad is not None:
            if single:
                _mm_into(short_grad, g_long.T, short_op)
            else:
                _addmm_fp32_(acc, g_long.T, short_op)
    if acc is not None:
        short_grad.copy_(acc)
    return parts


def _rows_pass(q, k, dq, write_tiles, out_scale, g_dtype, chunk) -> list[torch.Tensor]:
    """dQ by row chunks: each chunk's G [R, M] @ K is a complete GEMM (tiles only when
    ``dq`` is None: the partials alone are wanted)."""
    n, m = q.shape[0], k.shape[0]
    workspace = torch.empty(min(chunk, n) * m, dtype=g_dtype, device=q.device)
    parts = []
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        g = workspace[: (r1 - r0) * m].view(r1 - r0, m)
        parts.append(write_tiles(r0, r1, 0, m, g, out_scale))
        if dq is not None:
            _mm_into(dq[r0:r1], g, k)
    return parts


def _cols_pass(q, k, dk, write_tiles, out_scale, g_dtype, chunk) -> list[torch.Tensor]:
    """dK by column chunks: each chunk's G[:, c].T @ Q is a complete GEMM."""
    n, m = q.shape[0], k.shape[0]
    workspace = torch.empty(n * min(chunk, m), dtype=g_dtype, device=q.device)
    parts = []
    for c0 in range(0, m, chunk):
        c1 = min(c0 + chunk, m)
        g = workspace[: n * (c1 - c0)].view(n, c1 - c0)
        parts.append(write_tiles(0, n, c0, c1, g, out_scale))
        _mm_into(dk[c0:c1], g.T, q)
    return parts
