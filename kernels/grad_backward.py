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
workspace in the input dtype (fp32 for fp32 inputs; fp16 with an exact power-of-two
pre-scale so the small ``g * P`` entries stay out of fp16's subnormals). cuBLAS then
turns the chunks into ``dQ`` and ``dK`` on tensor cores (schedules in
``kernels.gradient_gemms``). Nothing is reduced with atomics, so the result is
bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gradient_gemms import gradient_gemms
from kernels.lse_forward import LseStats
from kernels.runtime import launch_kwargs, tile_config
from kernels.score_tile import flat_tile_grid, flat_tile_ids, score_tile


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
    out_scale_ptr,
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
    """Write one [BM, BN] tile of ``G = dL/dS * scale`` and its partial of ``dL/dscale``.

    Pointers: ``q_ptr`` [N, D] and ``k_ptr`` [M, D] (the chunk's rows/columns); ``scale_ptr``
    0-dim fp32; ``row_m_ptr``/``row_log2l_ptr`` [N] base-2 row statistics and ``g_row_ptr`` [N]
    row weights; ``col_m_ptr``/``col_log2l_ptr``/``g_col_ptr`` [M] the same for columns (read
    only with WITH_COLS, otherwise placeholders); ``out_ptr`` [N, M] workspace for ``G``;
    ``out_scale_ptr`` 0-dim power-of-two workspace scale; ``dscale_ptr`` one fp32 slot per program.
    Sizes: ``N``, ``M`` rows/columns of the chunk, ``D`` the embedding width.
    Strides: ``stride_q``, ``stride_k``, ``stride_out`` row strides (elements).
    ``label_offset``: row i's label column is ``i + label_offset``.
    Constexpr: ``BM``/``BN``/``BD`` tile sizes; ``WITH_COLS`` adds the column (symmetric) term;
    ``UPCAST`` computes the dot in fp32 (interpreter); ``PRECISION`` the ``tl.dot`` input precision.
    """
    pid_m, pid_n = flat_tile_ids(N, BM)
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
        is_label = cols[None, :] == (rows[:, None] + label_offset)
        if WITH_COLS:
            ds = tl.where(is_label, ds - (g_r[:, None] + g_c[None, :]), ds)
        else:
            ds = tl.where(is_label, ds - g_r[:, None], ds)
    # Padded rows/columns (acc = 0 there) hold finite junk: P <= 1 by the clamp above
    # (exact for real entries, where x <= max), so it adds 0 * finite to dL/ds and is
    # never stored.
    # dL/ds partial of this tile: one writer per slot, summed later in a fixed order.
    tl.store(dscale_ptr + pid_m * tl.cdiv(M, BN) + pid_n, tl.sum(tl.sum(ds * acc, axis=1), axis=0))
    # out_scale: a power of two that lifts fp16 workspaces out of fp16's subnormal range
    # (1 for bf16/fp32; see workspace_scale); exact, undone after the GEMMs.
    out_scale = tl.load(out_scale_ptr)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(
        out, (ds * (scale * out_scale)).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )


def grad_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    stats: LseStats,
    g_row: torch.Tensor,
    *,
    label_offset: int = 0,
    g_col: torch.Tensor | None = None,
    need_dq: bool = True,
    need_dk: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``sum_i g_i CE_row_i (+ sum_j h_j CE_col_j)`` in q, k and the scale.

    q: [N, D], k: [M, D]; scale: 0-dim fp32; stats: the forward's softmax statistics
    (with column statistics for the symmetric loss); g_row: [N] fp32 row weights;
    g_col: [M] fp32 column weights (symmetric loss) or None.
    need_dq / need_dk: False skips that side's GEMMs and returns None for it.
    Returns ``dq`` [N, D] (q's dtype), ``dk`` [M, D] (k's dtype), ``dscale`` 0-dim fp32.
    The schedule (one recompute pass or two) is ``kernels.gradient_gemms``'s.
    """
    n, d = q.shape
    m = k.shape[0]
    cfg = tile_config("ce_grad", q, n, m, d)
    with_cols = g_col is not None

    def write_tiles(r0, r1, c0, c1, out, out_scale):
        grid = flat_tile_grid(r1 - r0, c1 - c0, cfg.BM, cfg.BN)
        part = torch.empty(grid[0], 1, dtype=torch.float32, device=q.device)
        _grad_chunk_kernel[grid](
            q_ptr=q[r0:r1],
            k_ptr=k[c0:c1],
            scale_ptr=scale,
            row_m_ptr=stats.row_m2[r0:],
            row_log2l_ptr=stats.row_log2l[r0:],
            g_row_ptr=g_row[r0:],
            # Without columns the column pointers are never read: any fp32 tensor will do.
            col_m_ptr=stats.col_m2[c0:] if with_cols else g_row,
            col_log2l_ptr=stats.col_log2l[c0:] if with_cols else g_row,
            g_col_ptr=g_col[c0:] if with_cols else g_row,
            out_ptr=out,
            out_scale_ptr=out_scale,
            dscale_ptr=part,
            N=r1 - r0,
            M=c1 - c0,
            D=d,
            stride_q=q.stride(0),
            stride_k=k.stride(0),
            stride_out=out.stride(0),
            label_offset=label_offset + r0 - c0,
            WITH_COLS=with_cols,
            **launch_kwargs(cfg, q.dtype),
        )
        return part

    # |G| = |s| |g_i (P - onehot) + h_j (Pc - onehot)| <= |s| (max|g| + max|h|) (a negative
    # scale made the bound negative, and fp16's workspace scale 2^60: NaN gradients).
    g_bound = g_row.abs().amax() + (g_col.abs().amax() if with_cols else 0.0)
    dq, dk, parts = gradient_gemms(
        q, k, write_tiles, scale.abs() * g_bound, cfg.BM, cfg.BN, need_dq=need_dq, need_dk=need_dk
    )
    return dq, dk, parts[0]
