"""Triton kernels of the sigmoid (SigLIP) loss: the forward sum and the gradient tiles.

See ``kernels.sigmoid_loss`` for the math. Only imported when Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gradient_gemms import gradient_gemms
from kernels.lse_forward import _column_splits
from kernels.runtime import launch_kwargs, tile_config
from kernels.score_tile import flat_tile_grid, flat_tile_ids, score_tile


@triton.jit
def _exp_neg_abs(t):
    """``e^-|t|`` in fp32: in (0, 1], so neither helper below overflows for either sign of t."""
    return tl.exp2(-tl.abs(t) * 1.4426950408889634)


@triton.jit
def _softplus(t, e):
    """``log(1 + e^t) = max(t, 0) + log1p(e^-|t|)`` in fp32 (``e = _exp_neg_abs(t)``), with
    log1p from Goldberg's ``log(u) * x / (u - 1)``, ``u = 1 + x`` (exact to a few ulps where
    ``log(1 + x)`` alone loses all digits: x < 1e-7 near s * q.k + b = -16)."""
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log2(u) * 0.6931471805599453 * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(t, 0.0) + log1p


@triton.jit
def _sigmoid(t, e):
    """``1 / (1 + e^-t)`` (``e = _exp_neg_abs(t)``)."""
    r = 1.0 / (1.0 + e)
    return tl.where(t >= 0, r, e * r)


@triton.jit
def _label_sign(rows, cols, c0, pid_m, label_offset, BM: tl.constexpr, BN: tl.constexpr):
    """-1 where column == row + label_offset (the positives), +1 elsewhere: ``-z``."""
    sgn = tl.full((BM, BN), 1.0, dtype=tl.float32)
    diag_lo = pid_m * BM + label_offset
    if (c0 < diag_lo + BM) & (c0 + BN > diag_lo):  # only tiles crossing the diagonal
        sgn = tl.where(cols[None, :] == (rows[:, None] + label_offset), -1.0, 1.0)
    return sgn


@triton.jit
def _sigmoid_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    row_sum_ptr,
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
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """row_sum[split, i] = sum over this split's columns j of softplus(-z_ij * x_ij).

    Pointers: ``q_ptr`` [N, D] and ``k_ptr`` [M, D]; ``scale_ptr``/``bias_ptr`` 0-dim fp32;
    ``row_sum_ptr`` [splits, N] fp32, one row of partial sums per column split.
    Sizes: ``N``, ``M`` rows/columns, ``D`` the embedding width; ``cols_per_split`` columns per
    split (whole BN tiles).
    Strides: ``stride_q``, ``stride_k`` row strides (elements).
    ``label_offset``: row i's positive is column ``i + label_offset``.
    Constexpr: ``BM``/``BN``/``BD`` tile sizes; ``UPCAST`` computes the dot in fp32 (interpreter);
    ``PRECISION`` the ``tl.dot`` input precision.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    total = tl.zeros((BM,), dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, M)
    for c0 in range(col_start, col_end, BN):
        cols = c0 + tl.arange(0, BN)
        acc = score_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, UPCAST, PRECISION)
        sgn = _label_sign(rows, cols, c0, pid_m, label_offset, BM, BN)
        t = sgn * (acc * scale + bias)
        sp = _softplus(t, _exp_neg_abs(t))
        total += tl.sum(tl.where((cols < col_end)[None, :], sp, 0.0), axis=1)
    tl.store(row_sum_ptr + pid_s.to(tl.int64) * N + rows, total, mask=row_ok)


@triton.jit
def _sigmoid_grad_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    w_ptr,
    out_ptr,
    out_scale_ptr,
    part_ptr,
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
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out = s * dL/dx * out_scale for one tile; part[tile] = (sum dL/dx * q.k, sum dL/dx,
    sum softplus(-z * x)): the gradient tile and, from the same exponential, the loss's terms.

    Pointers: ``q_ptr`` [N, D] and ``k_ptr`` [M, D] (the chunk's rows/columns);
    ``scale_ptr``/``bias_ptr``/``w_ptr`` 0-dim fp32 (``w`` the upstream gradient / N);
    ``out_ptr`` [N, M] workspace; ``out_scale_ptr`` 0-dim power-of-two workspace scale;
    ``part_ptr`` [tiles, 3] fp32, one (dscale, dbias, loss sum) partial triple per program.
    Sizes: ``N``, ``M`` rows/columns of the chunk, ``D`` the embedding width.
    Strides: ``stride_q``, ``stride_k``, ``stride_out`` row strides (elements).
    ``label_offset``: row i's positive is column ``i + label_offset``.
    Constexpr: ``BM``/``BN``/``BD`` tile sizes; ``UPCAST`` computes the dot in fp32 (interpreter);
    ``PRECISION`` the ``tl.dot`` input precision.
    """
    pid_m, pid_n = flat_tile_ids(N, BM)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    w = tl.load(w_ptr)
    acc = score_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, UPCAST, PRECISION)
    ok = (rows < N)[:, None] & (cols < M)[None, :]  # here, not before the loop: fewer live tiles
    # The label as a mask, not a +-1 tile (_label_sign); entries outside the chunk at t = -inf
    # (e = 0: no gradient, no loss term) instead of masking each result; whole-tile sums. With
    # the loss's terms in this epilogue, fewer live fp32 tiles: ptxas at the table config
    # spills 72 bytes on sm_90 and none on sm_80, against 168 and 340 written the plain way.
    is_pos = cols[None, :] == (rows[:, None] + label_offset)
    x = acc * scale + bias
    t = tl.where(ok, tl.where(is_pos, -x, x), float("-inf"))  # -z * x
    e = _exp_neg_abs(t)
    # d softplus(-z * x) / dx = -z * sigmoid(-z * x): the label entries in fp32 directly.
    sig = w * _sigmoid(t, e)
    g = tl.where(is_pos, -sig, sig)
    tile = pid_m * tl.cdiv(M, BN) + pid_n
    tl.store(part_ptr + 3 * tile, tl.sum(g * acc))
    tl.store(part_ptr + 3 * tile + 1, tl.sum(g))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(_softplus(t, e)))
    out_scale = tl.load(out_scale_ptr)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, (g * (scale * out_scale)).to(out_ptr.dtype.element_ty), mask=ok)


def sigmoid_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, label_offset: int = 0
) -> torch.Tensor:
    """The loss (fp32 scalar). q: [N, D], k: [M, D] contiguous; scale, bias: 0-dim fp32."""
    n, d = q.shape
    m = k.shape[0]
    cfg = tile_config("sig_fwd", q, n, m, d)
    row_blocks = triton.cdiv(n, cfg.BM)
    splits = _column_splits(row_blocks, m, cfg.BN, q.device, None)
    cols_per_split = triton.cdiv(triton.cdiv(m, splits), cfg.BN) * cfg.BN
    splits = triton.cdiv(m, cols_per_split)
    row_sum = torch.empty(splits, n, dtype=torch.float32, device=q.device)
    _sigmoid_fwd_kernel[(row_blocks, splits)](
        q_ptr=q,
        k_ptr=k,
        scale_ptr=scale,
        bias_ptr=bias,
        row_sum_ptr=row_sum,
        N=n,
        M=m,
        D=d,
        stride_q=q.stride(0),
        stride_k=k.stride(0),
        cols_per_split=cols_per_split,
        label_offset=label_offset,
        **launch_kwargs(cfg, q.dtype),
    )
    return row_sum.sum(0).sum() / n  # fixed order: splits, then rows


def sigmoid_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    w: torch.Tensor,
    *,
    label_offset: int = 0,
    need_dq: bool = True,
    need_dk: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq``, ``dk`` (inputs' dtype), ``dscale``, ``dbias`` of ``w * N * loss``, and the
    loss's unnormalised sum ``N * loss`` (each 0-dim fp32), from the gradient pass over the
    tiles (``gradient_gemms``'s schedule).

    w: 0-dim fp32, the upstream gradient divided by N. need_dq / need_dk: False skips that
    side's GEMMs and returns None for it.
    """
    n, d = q.shape
    m = k.shape[0]
    cfg = tile_config("sig_grad", q, n, m, d)
    w = w.reshape(()).contiguous()

    def write_tiles(r0, r1, c0, c1, out, out_scale):
        grid = flat_tile_grid(r1 - r0, c1 - c0, cfg.BM, cfg.BN)
        part = torch.empty(grid[0], 3, dtype=torch.float32, device=q.device)
        _sigmoid_grad_kernel[grid](
            q_ptr=q[r0:r1],
            k_ptr=k[c0:c1],
            scale_ptr=scale,
            bias_ptr=bias,
            w_ptr=w,
            out_ptr=out,
            out_scale_ptr=out_scale,
            part_ptr=part,
            N=r1 - r0,
            M=c1 - c0,
            D=d,
            stride_q=q.stride(0),
            stride_k=k.stride(0),
            stride_out=out.stride(0),
            label_offset=label_offset + r0 - c0,
            **launch_kwargs(cfg, q.dtype),
        )
        return part

    # |dL/dx| <= |w|, and the workspace holds s * dL/dx.
    dq, dk, parts = gradient_gemms(
        q, k, write_tiles, scale.abs() * w.abs(), cfg.BM, cfg.BN, need_dq=need_dq, need_dk=need_dk
    )
    return dq, dk, parts[0], parts[1], parts[2]
