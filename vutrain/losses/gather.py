"""Collectives that move features between ranks for the contrastive losses.

Every loss in this package scores its local rows against the features of *all* ranks, so it
needs an all-gather. Two flavours exist because of how gradients should flow:

* `all_gather_with_grad`: autograd-aware. Backward sums, over ranks, the gradient that each
  rank's loss puts on this rank's slice (a reduce-scatter). With every rank's loss built on the
  gathered tensor, rank r's feature gradient is ``sum_k d loss_k / d feat_r``.
* `all_gather_no_grad`: a plain `dist.all_gather`; the gathered copies are constants. open_clip
  puts the local tensor back into its own slot so the local rows still get gradients from this
  rank's loss ("ensure grads for local rank").

We implement the autograd gather ourselves (a dozen lines) rather than use
`torch.distributed.nn.all_gather`, whose backward emulates reduce-scatter with all_to_all plus
a stack on non-NCCL backends: here gloo gets one all-reduce of the gradient (a collective every
backend has) and NCCL the cheaper reduce-scatter.

All ranks must pass tensors of identical shape (equal local batch: use drop_last in the loader);
`all_gather_with_grad` and `gather_features` refuse a mismatch on every rank in one line first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vutrain.distributed import collective_backend


def _gather_list(x: torch.Tensor) -> list[torch.Tensor]:
    """Plain all-gather into a list of `world_size` tensors shaped like `x`."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """[B, ...] per rank -> [world*B, ...] on every rank; backward reduces grads to the owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        return torch.cat(_gather_list(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # never modify autograd's buffer in place
        rank, b = dist.get_rank(), ctx.batch
        if _nccl_serves(grad.device):
            # reduce-scatter moves 1/world of the bytes an all-reduce does.
            out = torch.empty_like(grad[:b])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo: no reduce_scatter for all setups
        return grad[rank * b : (rank + 1) * b]


def _nccl_serves(device: torch.device) -> bool:
    """Whether NCCL runs this device's collectives: plain `nccl` or device-mapped `...,cuda:nccl`."""
    return collective_backend(device.type) == "nccl"


def all_gather_with_grad(x: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate `x` ([B, ...], same shape on every rank) from all ranks in rank order.

    Returns [world*B, ...]. Differentiable: backward gives each rank the sum over ranks of the
    gradient w.r.t. its own slice. `check_shapes=False` skips the shape agreement (one small
    all-reduce) where the caller already did it or the shape is fixed (a scalar).
    """
    if check_shapes:
        check_same_shape_on_all_ranks(x)
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate `x` from all ranks; remote slices carry no gradient.

    With `keep_local_grad`, this rank's slot holds `x` itself (open_clip's behaviour for
    `local_loss=False`), so the local rows still receive this rank's gradient.
    """
    with torch.no_grad():
        parts = _gather_list(x)
    if keep_local_grad:
        parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    check_shapes: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's `gather_features`: ([B, D], [B, D]) -> ([world*B, D], [world*B, D]).

    Without `gather_with_grad`, the local tensors replace their slot only when
    `local_loss=False` (with `local_loss=True` the local rows are the queries and get their
    gradient from there; the gathered keys are constants, exactly as in open_clip).
    """
    if world_size == 1:
        return image_features, text_features
    check_group(rank, world_size)
    if check_shapes:  # one small all-reduce; the losses pass text features of that shape
        check_same_shape_on_all_ranks(image_features)
    if gather_with_grad:
        return (
            all_gather_with_grad(image_features, check_shapes=False),
            all_gather_with_grad(text_features, check_shapes=False),
        )
    keep = not local_loss
    return (all_gather_no_grad(image_features, keep), all_gather_no_grad(text_features, keep))


def check_rank(rank: int, world_size: int) -> None:
    """Constructor-time check shared by every loss: a rank must lie inside its world."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def check_pairs(loss: str, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise a one-line ValueError unless the features are [B, D] pairs with B >= 1.

    Rows that do not pair up (e.g. several captions per image, [B, D] beside [k*B, D]) were
    scored anyway: SigLIP, and ClipLoss on rank > 0 with local_loss, silently took the wrong
    columns as positives; an empty batch gave a NaN loss that read as a numerical failure.
    """
    img, txt = image_features, text_features
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(
            f"{loss} needs image and text features of one shape [B, D] (row i of both is a pair), "
            f"got {tuple(img.shape)} and {tuple(txt.shape)}; pass one text per image"
        )
    if img.shape[0] == 0:
        raise ValueError(f"{loss} got an empty batch (0 pairs); every rank needs at least one (drop_last)")


def common_dtype(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both features in their promoted floating dtype (bf16 beside fp32 -> fp32).

    Towers may legitimately leave in different dtypes (one under autocast, a LoRA head or a
    frozen tower kept in fp32); the matmul refused the mix with a torch traceback. The cast is
    differentiable, so each tower still gets its gradient in its own dtype. The gathers need one
    dtype per tensor on every rank, which holds when every rank runs the same model.
    """
    img, txt = image_features, text_features
    if not (img.is_floating_point() and txt.is_floating_point()):
        raise ValueError(
            f"contrastive losses need floating-point features, got {img.dtype} and {txt.dtype}; "
            "pass the towers' (L2-normalised) float embeddings"
        )
    dtype = torch.promote_types(img.dtype, txt.dtype)
    return img.to(dtype), txt.to(dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 if it is 16-bit (differentiable: its gradient comes back in its own dtype).

    The torch path forms the logits from the gathered features with this, as the kernels
    accumulate their tiles in fp32: formed from bf16 features, the logits kept 8 bits (0.5 at a
    logit of 100) and the loss came back in bf16 (20.0 for 20.12), so backend=torch and
    backend=triton disagreed on the same inputs. The gathers still move the 16-bit features.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def small_collective_device(device: torch.device) -> torch.device:
    """Where a collective of a few integers the host must read runs: the CPU when the group has a
    CPU backend (the default cpu:gloo,cuda:nccl; agreeing between hosts costs no wait on the
    device queue), else `device` (a CUDA-only group, nccl or cuda:gloo, refuses CPU tensors)."""
    return torch.device("cpu") if collective_backend("cpu") is not None else device


def check_same_shape_on_all_ranks(x: torch.Tensor) -> None:
    """Raise the same one-line ValueError on every rank unless all ranks pass `x` of one shape
    (one all-reduce of 2 * x.dim() integers, read on the host).

    The gathers and the ring exchange need one shape everywhere: with a short last batch on one
    rank (a loader without drop_last) gloo aborted the processes with SIGABRT and no word on
    the cause, and NCCL may hang or read past the smaller tensor.
    """
    shape = list(x.shape)
    # max(shape) and -min(shape) from one all-reduce
    # Made where it is reduced: a tensor made without a device lands on the default device
    # (`meta` in test_review_nccl), not the host.
    where = small_collective_device(x.device)
    extremes = torch.tensor(shape + [-n for n in shape], dtype=torch.long, device=where)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    largest, smallest = extremes[: len(shape)].tolist(), [-n for n in extremes[len(shape) :].tolist()]
    if largest != smallest:
        raise ValueError(
            f"contrastive loss: the ranks pass features of different shapes (from {smallest} to "
            f"{largest}; this rank {shape}); every rank needs the same local batch: drop the last "
            "partial batch (drop_last=True)"
        )


def check_group(rank: int, world_size: int) -> None:
    """Fail loudly when the loss was built for a different process group than the live one."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"loss built with world_size={world_size} but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or build the loss with world_size=1"
        )
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"loss built for rank={rank}, world_size={world_size} but the process group has "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}; pass the live values"
        )
