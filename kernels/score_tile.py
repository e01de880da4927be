"""The shared building block: one fp32 tile of the unscaled scores ``Q @ K.T``.

Only imported when Triton is installed (the public ops import it lazily).
"""

import triton
import triton.language as tl


@triton.jit
def score_tile(
    q_ptr,
    k_ptr,
    rows,
    cols,
    N,
    M,
    D,
    stride_q,
    stride_k,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc[BM, BN] = Q[rows] @ K[cols].T`` in fp32, streaming D in ``BD`` slabs.

    rows: [BM] int row ids, cols: [BN] int column ids; rows >= N / cols >= M and
    the D tail are loaded as zeros (any D works, no multiple-of-BD restriction).
    Both inputs are row-major with unit stride along D.
    UPCAST: convert 16-bit inputs to fp32 right after loading; needed under the
    interpreter, which computes bf16 arithmetic on raw bit patterns.
    """
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    row_ok = rows < N
    col_ok = cols < M
    # int64 offsets: N * stride overflows int32 at 64k rows x 32k+ elements.
    q_base = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    k_base = k_ptr + cols.to(tl.int64)[None, :] * stride_k
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        q = tl.load(q_base + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(k_base + ds[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(q, kt, acc, input_precision=PRECISION)
    return acc


# CUDA caps grid axes 1 and 2 at 65535 blocks: a 2-D (row tiles, column tiles) grid
# failed to launch past 8.4M columns at BN = 128 (e.g. one query row against a large
# gallery). The gradient kernels therefore launch a flat grid of all tiles (axis 0 takes
# 2^31 - 1) and recover the tile here.
def flat_tile_grid(rows: int, cols: int, bm: int, bn: int) -> tuple[int]:
    """Launch grid covering ``rows x cols`` with ``bm x bn`` tiles, one program per tile."""
    return (triton.cdiv(rows, bm) * triton.cdiv(cols, bn),)


@triton.jit
def flat_tile_ids(N, BM: tl.constexpr):
    """``(row block, column block)`` of this program in a :func:`flat_tile_grid`: row blocks
    vary fastest, the order in which a 2-D ``(row tiles, column tiles)`` grid launched (the
    programs running together share a column block of K)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BM)
    return pid % row_tiles, pid // row_tiles
