"""ZeRO-1/2's reduced gradients copied back in one multi-tensor copy, or not at all on one rank.

With ``contiguous_gradients`` off (vutrain's default, param_alignment.py), ZeRO-1 and 2 reduce
the gradients at the boundary through ``DeepSpeedZeroOptimizer.allreduce_and_copy``: flatten the
bucket (one copy of every gradient), all-reduce, then ``buf.copy_(synced)`` for each gradient in
a Python loop: one copy kernel per parameter, 398 of the 1191 ops a ViT-B/32 backward dispatches
(``tools/count_step_ops.py``), on a batch-256 step that is bound by the host on an H200 (issue 9).

:func:`use_batched_copy_back` wraps the method on the optimizer:

- several ranks: the same all-reduce, then one ``torch._foreach_copy_`` for the whole bucket
  (a few multi-tensor kernels on CUDA; the same values, bit for bit);
- one data-parallel rank: nothing at all when the reduction is an identity (a sum over one rank,
  a division by 1, the communication dtype equal to the gradients' or an exact widening of them),
  which skips the flatten, the all-reduce and the copies.

Anything else (``overlap_comm``, whose side-stream bookkeeping stays DeepSpeed's; reductions into
partition outputs; sequence parallelism) takes DeepSpeed's own method.
"""

from __future__ import annotations

import functools

import torch

# Widening casts that a round trip undoes exactly (the all-reduce's dtype and back).
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def use_batched_copy_back(optimizer) -> bool:
    """Wrap a ZeRO-1/2 optimizer's ``allreduce_and_copy`` in place; False for any other."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # pragma: no cover - deepspeed is a core requirement
        return False
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    original = optimizer.allreduce_and_copy
    if getattr(original, "_vutrain_batched", False):
        return True

    @functools.wraps(original)
    def allreduce_and_copy(
        small_bucket,
        communication_data_type,
        rank=None,
        log=None,
        divide=True,
        process_group=None,
        output_bucket=None,
    ):
        group = optimizer.dp_process_group if process_group is None else process_group
        if (
            optimizer.overlap_comm
            or getattr(optimizer, "sequence_parallel_size", 1) != 1
            or (output_bucket is not None and any(out is not None for out in output_bucket))
        ):
            return original(
                small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
                process_group=process_group, output_bucket=output_bucket,
            )  # fmt: skip
        if _single_rank_identity(small_bucket, communication_data_type, group):
            return None
        reduced = optimizer.allreduce_bucket(
            small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
            process_group=group,
        )  # fmt: skip
        import deepspeed.comm as dist

        if rank is None or rank == dist.get_rank(group=group):
            copy_all(small_bucket, optimizer.unflatten(reduced, small_bucket))
        return None

    allreduce_and_copy._vutrain_batched = True
    optimizer.allreduce_and_copy = allreduce_and_copy
    return True


def _single_rank_identity(bucket, communication_data_type, group) -> bool:
    """Whether reducing `bucket` over `group` would leave every gradient as it is."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero import stage_1_and_2

    if dist.get_world_size(group=group) != 1:
        return False
    # DeepSpeed's correctness test forces fp32 communication; covered by the widening rule.
    wire = torch.float32 if stage_1_and_2.pg_correctness_test else communication_data_type
    return all(t.dtype == wire or (t.dtype, wire) in _EXACT_WIDENING for t in bucket)


def copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for every pair, as one multi-tensor copy where torch has one."""
    if not destinations:
        return
    with torch.no_grad():
        try:
            torch._foreach_copy_(destinations, sources)
        except (RuntimeError, AttributeError):  # e.g. mixed devices, or a torch without it
            for dst, src in zip(destinations, sources):
                dst.copy_(src)
