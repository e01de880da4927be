"""Forward pass: row (and optionally column) log-sum-exp of ``s * Q @ K.T`` over
tiles, without ever allocating the ``N x M`` logits.

Grid: ``(row_blocks, column_splits)``. Each program owns ``BM`` rows and one
contiguous range of columns, walks it in ``BN`` tiles and keeps an online
(running-max) log-sum-exp in base 2 and fp32. Splitting the columns lets a small
local N against a large gathered M still fill the GPU; the per-split partials
(``[splits, N]``) are merged afterwards in a fixed order, so results are
deterministic (no atomics, no locks).

With ``WITH_COLS`` (the symmetric CLIP loss) each tile also reduces its columns
over its ``BM`` rows and writes ``[row_blocks, M]`` partials; the host processes
rows in chunks so that this workspace stays bounded.

All LSE values are kept in base 2 (``log2 sum 2^x`` with ``x = s * log2(e) * q.k``):
``exp2`` is the hardware instruction, and ``ln = log2 * ln(2)`` at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.runtime import launch_kwargs, num_sms, tile_config
from kernels.score_tile import score_tile

LOG2E = 1.4426950408889634
LN2 = math.log(2.0)

# Bound on the [row_blocks, M] column-partial workspace (two fp32 buffers).
COL_WORKSPACE_BYTES = 32 * 2**20


@triton.jit
def _lse_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    row_m_ptr,
    row_l_ptr,
    pos_ptr,
    col_m_ptr,
    col_l_ptr,
    N,
    M,
    D,
    stride_q,
    stride_k,
    cols_per_split,
    label_offset,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    WITH_COLS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online base-2 log-sum-exp of one BM row block over one column split.

    Pointers: ``q_ptr`` [N, D] and ``k_ptr`` [M, D]; ``scale_ptr`` 0-dim fp32; ``row_m_ptr``/
    ``row_l_ptr`` [splits, N] per-split running max and sum; ``pos_ptr`` [N] the label logit
    (base 2), written by the one program whose tile holds it; ``col_m_ptr``/``col_l_ptr``
    [row_blocks, M] per-row-block column partials (written only with WITH_COLS, otherwise
    placeholders).
    Sizes: ``N``, ``M`` rows/columns, ``D`` the embedding width; ``cols_per_split`` columns per
    split (whole BN tiles).
    Strides: ``stride_q``, ``stride_k`` row strides (elements).
    ``label_offset``: row i's label column is ``i + label_offset``.
    Constexpr: ``BM``/``BN``/``BD`` tile sizes; ``WITH_COLS`` also writes column partials;
    ``UPCAST`` computes the dot in fp32 (interpreter); ``PRECISION`` the ``tl.dot`` input precision.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634  # fold log2(e) into the scale once
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, M)
    diag_lo = pid_m * BM + label_offset  # label column of this block's first row
    for c0 in range(col_start, col_end, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < col_end
        acc = score_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, UPCAST, PRECISION)
        x = tl.where(row_ok[:, None] & col_ok[None, :], acc * scale2, float("-inf"))
        # Online log-sum-exp with a true running max (a fixed shift underflows at s=100). Rows
        # past N (all -inf) keep a finite max of 0: their sums stay 0 and are never stored.
        m_new = tl.where(row_ok, tl.maximum(m_i, tl.max(x, axis=1)), 0.0)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m_i = m_new
        # The positive logit of a row lies in exactly one tile of one split: that
        # program writes it (base 2, the very bits that entered the running max, so
        # max - positive is exactly 0 when the positive is the max), no second pass.
        # Only tiles crossing the label diagonal pay for it.
        if (c0 < diag_lo + BM) & (c0 + BN > diag_lo):
            # Whether a row's label column is in this tile, from the row's index (a [BM] vector),
            # not by counting a [BM, BN] mask: one tile fewer in registers (spills, BENCHMARKS.md).
            label_col = rows + label_offset
            found = (label_col >= c0) & (label_col < tl.minimum(c0 + BN, col_end))
            pos = tl.sum(tl.where(cols[None, :] == label_col[:, None], x, 0.0), axis=1)
            tl.store(pos_ptr + rows, pos, mask=row_ok & found)
        if WITH_COLS:
            # x is -inf past N already: no second masked tile (it spilled at BN = 256).
            # Padded columns would give -inf - -inf = nan; keep them finite (never stored).
            cm = tl.where(col_ok, tl.max(x, axis=0), 0.0)
            cl = tl.sum(tl.exp2(x - cm[None, :]), axis=0)
            off = pid_m.to(tl.int64) * M + cols
            tl.store(col_m_ptr + off, cm, mask=col_ok)
            tl.store(col_l_ptr + off, cl, mask=col_ok)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(row_m_ptr + out, m_i, mask=row_ok)
    tl.store(row_l_ptr + out, l_i, mask=row_ok)


def merge_lse2(m: torch.Tensor, lsum: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge base-2 partials ``(max, sum 2^(x-max))`` along ``dim``; fixed order, deterministic."""
    mm = m.amax(dim=dim)
    # Partials never hold -inf maxima for real rows/columns (each covers >= 1 column/row).
    ll = (lsum * torch.exp2(m - mm.unsqueeze(dim))).sum(dim=dim)
    return mm, ll


def _column_splits(row_blocks: int, m: int, bn: int, device: torch.device, col_splits: int | None) -> int:
    """Enough column splits that row_blocks * splits covers the GPU about twice."""
    col_tiles = triton.cdiv(m, bn)
    if col_splits is None:
        col_splits = triton.cdiv(2 * num_sms(device), row_blocks)
    return max(1, min(col_splits, col_tiles))


@dataclass
class LseStats:
    """Per-row (and per-column) softmax statistics of ``S = s * Q @ K.T``, fp32, base 2.

    ``m2``: max of ``S * log2(e)``; ``log2l``: ``log2 sum 2^(S*log2(e) - m2)``; ``ce``:
    cross-entropy (natural log) against the label. Kept apart rather than as one
    ``lse = m2 + log2l``: near one-hot rows have ``log2l ~ 1e-6``, which one fp32 sum at
    magnitude ~144 (s = 100) would round away, in the loss and in ``P - 1``.
    """

    row_m2: torch.Tensor
    row_log2l: torch.Tensor
    row_ce: torch.Tensor
    col_m2: torch.Tensor | None = None
    col_log2l: torch.Tensor | None = None
    col_ce: torch.Tensor | None = None


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    label_offset: int = 0,
    with_cols: bool = False,
    col_splits: int | None = None,
) -> LseStats:
    """Row (and optionally column) softmax statistics of ``S = scale * q @ k.T``.

    q: [N, D], k: [M, D] (same dtype, contiguous), scale: 0-dim fp32 tensor on q's device.
    Row i's label is column ``label_offset + i``; with ``with_cols`` (square problems,
    label_offset 0) column j's label is row j. All outputs are [N] or [M] fp32.
    """
    n, d = q.shape
    m = k.shape[0]
    dev = q.device
    cfg = tile_config("ce_fwd", q, n, m, d)
    pos = torch.empty(n, dtype=torch.float32, device=dev)
    row_m_parts, row_l_parts = [], []
    col_m = col_l = None
    # Row chunks bound the [row_blocks, M] column workspace; without columns one chunk.
    rows_per_chunk = n
    if with_cols:
        blocks = max(1, COL_WORKSPACE_BYTES // (8 * m))
        rows_per_chunk = min(n, blocks * cfg.BM)
    for r0 in range(0, n, rows_per_chunk):
        qc = q[r0 : r0 + rows_per_chunk]
        nc = qc.shape[0]
        row_blocks = triton.cdiv(nc, cfg.BM)
        splits = _column_splits(row_blocks, m, cfg.BN, dev, col_splits)
        # Each split covers whole BN tiles so tiles never straddle two splits.
        cols_per_split = triton.cdiv(triton.cdiv(m, splits), cfg.BN) * cfg.BN
        splits = triton.cdiv(m, cols_per_split)
        rm = torch.empty(splits, nc, dtype=torch.float32, device=dev)
        rl = torch.empty_like(rm)
        if with_cols:
            cm = torch.empty(row_blocks, m, dtype=torch.float32, device=dev)
            cl = torch.empty_like(cm)
        else:
            cm = cl = rm  # unused placeholders (WITH_COLS is a constexpr)
        _lse_fwd_kernel[(row_blocks, splits)](
            q_ptr=qc,
            k_ptr=k,
            scale_ptr=scale,
            row_m_ptr=rm,
            row_l_ptr=rl,
            pos_ptr=pos[r0:],
            col_m_ptr=cm,
            col_l_ptr=cl,
            N=nc,
            M=m,
            D=d,
            stride_q=qc.stride(0),
            stride_k=k.stride(0),
            cols_per_split=cols_per_split,
            label_offset=label_offset + r0,
            WITH_COLS=with_cols,
            **launch_kwargs(cfg, q.dtype),
        )
        mm, ll = merge_lse2(rm, rl)
        row_m_parts.append(mm)
        row_l_parts.append(ll)
        if with_cols:
            cmm, cll = merge_lse2(cm, cl)
            if col_m is None:
                col_m, col_l = cmm, cll
            else:
                col_m, col_l = merge_lse2(torch.stack([col_m, cmm]), torch.stack([col_l, cll]))
    row_m2, row_log2l = torch.cat(row_m_parts), torch.log2(torch.cat(row_l_parts))
    stats = LseStats(row_m2, row_log2l, ((row_m2 - pos) + row_log2l) * LN2)
    if with_cols:
        stats.col_m2, stats.col_log2l = col_m, torch.log2(col_l)
        stats.col_ce = ((col_m - pos) + stats.col_log2l) * LN2  # the diagonal is both labels
    return stats
