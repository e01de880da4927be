"""Backward pass: recompute score tiles, form the logit gradient in fp32, and hand
it to dense GEMMs one bounded chunk at a time.

For ``S = s * Q @ K.T`` and per-row weights ``g`` (the upstream gradient of each
row's cross-entropy), the gradient of the loss in the logits is

    dL/dS_ij = g_i (P_ij - [j == off + i])            P = softmax over the row
             + h_j (Pc_ij - [i == j - off])           (symmetric loss only: Pc = softmax
                                                       over the column, h = column weights)

so ``dQ = s * dS @ K``, ``dK = s * dS.T @ Q`` and ``dL/ds = sum_ij dS_ij (Q @ K.T)_ij``.

A Triton kernel recomputes each tile of ``S`` from Q and K, forms ``s * dS`` in fp32
(the one-hot label term is subtracted in fp32 *before* any cast: at s = 100 the
positive's probability rounds to 1 in bf16 and ``P - 1`` would cancel to 0), writes
the tile's ``dL/ds`` partial to its own slot, and stores ``s * dS`` into a bounded
workspace (all of the shorter side x a chunk of the longer side): bf16 for bf16
inputs (bf16 keeps fp32's exponent range), fp32 otherwise (fp16's range would
flush the small ``g * P`` entries to zero). cuBLAS then turns the chunks into
``dQ`` and ``dK`` (schedules in ``grad_backward``). Nothing is reduced with atomics, so the
result is bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lse_forward import LseStats
from kernels.runtime import dot_precision, interpreting, tile_config
from kernels.score_tile import score_tile

# Bound on the gradient workspace (one chunk of G = s * dL/dS).
GRAD_WORKSPACE_BYTES = 32 * 2**20
# Shortest long-side chunk for the accumulate schedule: an fp32 [short, D] buffer is
# read and written once per chunk, which stays cheap next to the chunk's GEMM only
# when the chunk is long (arithmetic intensity ~ chunk / 4 FLOP per byte).
ACCUMULATE_MIN_CHUNK = 1024


@triton.jit
def _grad_chunk_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    row_m_ptr,
    row_log2l_ptr,
    g_row_ptr,
    col_m_ptr,
    col_log2l_ptr,
    g_col_ptr,
    out_ptr,
    dscale_ptr,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_out,
    label_offset,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    WITH_COLS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    col_ok = cols < M
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = score_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, UPCAST, PRECISION)
    scale2 = scale * 1.4426950408889634
    # P = 2^min((x - max) - log2 l, 0) with x = acc * s * log2(e) recomputed where used
    # (fewer live [BM, BN] tiles); subtracting the max first keeps P's distance from 1
    # (near one-hot rows) instead of rounding it away at |x| ~ 144.
    m_r = tl.load(row_m_ptr + rows, mask=row_ok, other=0.0)
    l_r = tl.load(row_log2l_ptr + rows, mask=row_ok, other=0.0)
    g_r = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0)
    ds = g_r[:, None] * tl.exp2(tl.minimum((acc * scale2 - m_r[:, None]) - l_r[:, None], 0.0))
    if WITH_COLS:  # consumed at once: keeping both P tiles live spills registers
        m_c = tl.load(col_m_ptr + cols, mask=col_ok, other=0.0)
        l_c = tl.load(col_log2l_ptr + cols, mask=col_ok, other=0.0)
        g_c = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0)
        ds += g_c[None, :] * tl.exp2(tl.minimum((acc * scale2 - m_c[None, :]) - l_c[None, :], 0.0))
    # Label term, in fp32 before any cast, only in tiles crossing the diagonal.
    diag_lo = pid_m * BM + label_offset
    if (pid_n * BN < diag_lo + BM) & (pid_n * BN + BN > diag_lo):
        is_label = (cols[None, :] == (rows[:, None] + label_offset)).to(tl.float32)
        if WITH_COLS:
            ds -= (g_r[:, None] + g_c[None, :]) * is_label
        else:
            ds -= g_r[:, None] * is_label
    # Padded rows/columns (acc = 0 there) hold finite junk: P <= 1 by the clamp above
    # (exact for real entries, where x <= max), so it adds 0 * finite to dL/ds and is
    # never stored.
    # dL/ds partial of this tile: one writer per slot, summed later in a fixed order.
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(ds * acc, axis=1), axis=0))
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, (ds * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation and one rounding to ``out``'s dtype."""
    if a.is_cuda and a.dtype == out.dtype:
        torch.mm(a, b, out=out)  # cuBLAS accumulates 16-bit GEMMs in fp32
    else:
        out.copy_(torch.mm(a.float(), b.float()))  # CPU / mixed dtypes: exact fp32


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` without an [M, D] fp32 temporary on CUDA."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # torch without addmm(out_dtype=, out=)
            pass
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.float(), b.float())


def _grad_tiles(q, k, scale, stats, g_row, g_col, r0, c0, label_offset, out) -> torch.Tensor:
    """Launch the kernel on rows ``q`` (global rows from r0) x columns ``k`` (from c0):
    writes ``s * dS`` into ``out`` [len(q), len(k)] and returns the tiles' dL/ds partials."""
    cfg = tile_config()
    n, d = q.shape
    m = k.shape[0]
    with_cols = g_col is not None
    grid = (triton.cdiv(n, cfg.BM), triton.cdiv(m, cfg.BN))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device)
    _grad_chunk_kernel[grid](
        q, k, scale, stats.row_m2[r0:], stats.row_log2l[r0:], g_row[r0:],
        stats.col_m2[c0:] if with_cols else g_row, stats.col_log2l[c0:] if with_cols else g_row,
        g_col[c0:] if with_cols else g_row,
        out, part, n, m, d, q.stride(0), k.stride(0), out.stride(0), label_offset + r0 - c0,
        BM=cfg.BM, BN=cfg.BN, BD=cfg.BD, WITH_COLS=with_cols,
        UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return part


def _chunk_len(other_len: int, g_dtype: torch.dtype, block: int) -> int:
    """Rows (or columns) per workspace chunk when the chunk spans ``other_len``."""
    fit = GRAD_WORKSPACE_BYTES // (other_len * (torch.finfo(g_dtype).bits // 8))
    return max(block, fit // block * block)


def grad_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    stats: LseStats,
    g_row: torch.Tensor,
    *,
    label_offset: int = 0,
    g_col: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i g_i CE_row_i (+ sum_j h_j CE_col_j)`` in q, k and the scale.

    q: [N, D], k: [M, D]; scale: 0-dim fp32; stats: the forward's softmax statistics
    (with column statistics for the symmetric loss); g_row: [N] fp32 row weights;
    g_col: [M] fp32 column weights (symmetric loss) or None.
    Returns ``dq`` [N, D] (q's dtype), ``dk`` [M, D] (k's dtype), ``dscale`` 0-dim fp32.

    Schedules, all within the GRAD_WORKSPACE_BYTES workspace:
    - one chunk: G [N, M] fits; two GEMMs.
    - accumulate: the workspace spans the shorter side and a chunk of the longer one;
      the long side's gradient is one complete GEMM per chunk, the short side's adds
      into an fp32 [short, D] buffer. Used when chunks are long (>= ACCUMULATE_MIN_CHUNK),
      e.g. the gathered N << M case, where the buffer is small and the adds cheap.
    - two passes: otherwise (large square problems) the tiles are recomputed once for
      row chunks (dQ) and once for column chunks (dK): 10NMD instead of 8NMD, but no
      [N, D] fp32 buffer and no K-thin accumulating GEMMs streaming it per chunk.
    """
    cfg = tile_config()
    n, m = q.shape[0], k.shape[0]
    g_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    # fp16 runs its GEMMs in fp32: fp16's range would flush small gradient entries.
    q_g, k_g = q.to(g_dtype), k.to(g_dtype)
    rows_chunk = _chunk_len(m, g_dtype, cfg.BM)  # rows per chunk spanning all M columns
    cols_chunk = _chunk_len(n, g_dtype, cfg.BN)  # columns per chunk spanning all N rows
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    args = (scale, stats, g_row, g_col, label_offset)
    by_rows = n >= m
    long_chunk = rows_chunk if by_rows else cols_chunk
    if long_chunk >= (n if by_rows else m) or long_chunk >= ACCUMULATE_MIN_CHUNK:
        parts = _accumulate(q, k, q_g, k_g, dq, dk, by_rows, long_chunk, g_dtype, args)
    else:
        parts = _rows_pass(q, k, k_g, dq, rows_chunk, g_dtype, args)
        _cols_pass(q, k, q_g, dk, cols_chunk, g_dtype, args)  # its dL/ds partials repeat the row pass's
    return dq, dk, torch.cat(parts).sum()


def _accumulate(q, k, q_g, k_g, dq, dk, by_rows, chunk, g_dtype, args) -> list[torch.Tensor]:
    n, d = q.shape
    m = k.shape[0]
    long_len, short_len = (n, m) if by_rows else (m, n)
    chunk = min(chunk, long_len)
    single = chunk >= long_len
    acc = None if single else torch.zeros(short_len, d, dtype=torch.float32, device=q.device)
    workspace = torch.empty(chunk * short_len, dtype=g_dtype, device=q.device)
    parts = []
    for s0 in range(0, long_len, chunk):
        s1 = min(s0 + chunk, long_len)
        if by_rows:  # G = [rows s0:s1, all M]
            g = workspace[: (s1 - s0) * m].view(s1 - s0, m)
            parts.append(_grad_tiles(q[s0:s1], k, *args[:4], s0, 0, args[4], g))
            _mm_into(dq[s0:s1], g, k_g)
            if single:
                _mm_into(dk, g.T, q_g)
            else:
                _addmm_fp32_(acc, g.T, q_g[s0:s1])
        else:  # G = [all N, columns s0:s1]
            g = workspace[: n * (s1 - s0)].view(n, s1 - s0)
            parts.append(_grad_tiles(q, k[s0:s1], *args[:4], 0, s0, args[4], g))
            _mm_into(dk[s0:s1], g.T, q_g)
            if single:
                _mm_into(dq, g, k_g)
            else:
                _addmm_fp32_(acc, g, k_g[s0:s1])
    if acc is not None:
        (dk if by_rows else dq).copy_(acc)
    return parts


def _rows_pass(q, k, k_g, dq, chunk, g_dtype, args) -> list[torch.Tensor]:
    """dQ by row chunks: each chunk's G [R, M] @ K is a complete GEMM."""
    n, m = q.shape[0], k.shape[0]
    workspace = torch.empty(min(chunk, n) * m, dtype=g_dtype, device=q.device)
    parts = []
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        g = workspace[: (r1 - r0) * m].view(r1 - r0, m)
        parts.append(_grad_tiles(q[r0:r1], k, *args[:4], r0, 0, args[4], g))
        _mm_into(dq[r0:r1], g, k_g)
    return parts


def _cols_pass(q, k, q_g, dk, chunk, g_dtype, args) -> list[torch.Tensor]:
    """dK by column chunks: each chunk's G[:, c].T @ Q is a complete GEMM."""
    n, m = q.shape[0], k.shape[0]
    workspace = torch.empty(n * min(chunk, m), dtype=g_dtype, device=q.device)
    parts = []
    for c0 in range(0, m, chunk):
        c1 = min(c0 + chunk, m)
        g = workspace[: n * (c1 - c0)].view(n, c1 - c0)
        parts.append(_grad_tiles(q, k[c0:c1], *args[:4], 0, c0, args[4], g))
        _mm_into(dk[c0:c1], g.T, q_g)
    return parts
