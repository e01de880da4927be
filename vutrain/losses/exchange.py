"""Neighbour exchange around the ring of ranks, differentiable (open_clip's NeighbourExchange).

`SigLipLoss(bidir=True)` passes text features from rank to rank instead of all-gathering them,
so each rank only ever scores a B x B block at a time. Each exchange is a point-to-point
isend/irecv pair; its backward is the opposite exchange of the gradient (what I received from
the left I send back to the left), so gradients reach the rank that owns the features.

Every rank builds the same autograd graph, so the backward exchanges run in the same order
on every rank and always find their peer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vutrain.losses.gather import _nccl_serves


def p2p_supported(device: torch.device) -> bool:
    """Whether the default group can send tensors on `device` point to point.

    Gloo's send and recv hand the tensor's data pointer to its transport, which reads it from the
    host: CPU tensors only (no staging through host memory, unlike its all-gather), so a CUDA
    tensor under `cuda:gloo` (several ranks on one GPU) or plain `gloo` would be read through a
    device pointer. NCCL sends CUDA tensors.
    """
    return device.type == "cpu" or _nccl_serves(device)


def _exchange(
    sends: list[tuple[int, torch.Tensor]], recv_from: list[int], like: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Post all sends and receives at once (no ordering deadlock), wait, return the received."""
    # Contiguous buffers: empty_like keeps a transposed input's strides, and recv refuses them.
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for peer, buf in zip(recv_from, received)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Send `x` to `to_rank`, receive the same-shaped tensor from `from_rank`."""

    @staticmethod
    def forward(ctx, from_rank: int, to_rank: int, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        return _exchange([(to_rank, x)], [from_rank], [x])[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        back = _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, grad.contiguous())
        return None, None, back


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Send one tensor to each neighbour, receive one from each: (from_left, from_right)."""

    @staticmethod
    def forward(
        ctx,
        left: int,
        right: int,
        to_left: torch.Tensor,  # type: ignore[override]
        to_right: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.left, ctx.right = left, right
        from_left, from_right = _exchange(
            [(left, to_left), (right, to_right)], [left, right], [to_right, to_left]
        )
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):  # type: ignore[override]
        # from_left came from the left neighbour's to_right: its gradient goes back left, and
        # what arrives from the left is the gradient of the to_left we sent there.
        back = _NeighbourExchangeBidir.apply(
            ctx.left, ctx.right, grad_from_left.contiguous(), grad_from_right.contiguous()
        )
        return (None, None) + tuple(back)


def neighbour_exchange(from_rank: int, to_rank: int, x: torch.Tensor) -> torch.Tensor:
    """Differentiable: send `x` to `to_rank`, return the tensor `from_rank` sent to us."""
    return _NeighbourExchange.apply(from_rank, to_rank, x)


def neighbour_exchange_bidir(
    left: int,
    right: int,
    to_left: torch.Tensor,
    to_right: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable: send to both neighbours, return (from_left, from_right)."""
    return _NeighbourExchangeBidir.apply(left, right, to_left, to_right)
