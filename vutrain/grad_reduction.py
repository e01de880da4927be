"""ZeRO-1/2's gradient reduction without per-parameter work that reduces nothing.

With ``contiguous_gradients`` off (vutrain's default, param_alignment.py), ZeRO-1 and 2 reduce
the gradients at the boundary through ``DeepSpeedZeroOptimizer.allreduce_and_copy``: flatten the
bucket (one copy of every gradient), all-reduce, then ``buf.copy_(synced)`` for each gradient in
a Python loop: one copy kernel per parameter, 398 of the 1191 ops a ViT-B/32 backward dispatches
(``tools/count_step_ops.py``), on a batch-256 step that is bound by the host on an H200 (issue 9).
Before that, ZeRO-1's ``reduce_gradients`` files every parameter into the bucket, one Python call
chain per parameter.

:func:`use_lean_reduction` wraps the optimizer's methods in place:

- ``allreduce_and_copy``, several ranks: the same all-reduce, then one ``torch._foreach_copy_``
  for the whole bucket (a few multi-tensor kernels on CUDA; the same values, bit for bit);
- ``allreduce_and_copy``, one data-parallel rank: nothing at all when the reduction is an identity
  (a sum over one rank, a division by 1, the communication dtype equal to the gradients' or an
  exact widening of them): no flatten, no all-reduce, no copies;
- ``reduce_gradients`` (ZeRO-1's boundary), one rank: straight to DeepSpeed's epilogue, which
  builds the step's flat gradients from the parameters' own, without filing each parameter into a
  bucket whose reduction would be that identity;
- ZeRO-2, one rank: its per-parameter gradient hooks are removed. They exist for partitioning
  (nothing to partition on one rank) and run a Python call chain per parameter in every backward
  (398 for ViT-B/32) to file it into that same identity bucket; without them the engine's own
  call of the epilogue after each backward does the work, as at ZeRO-1.

Anything else (``overlap_comm``, whose side-stream bookkeeping stays DeepSpeed's; reductions into
partition outputs; sequence parallelism; MoE; CPU offload; pipeline parallelism) takes
DeepSpeed's own methods.
"""

from __future__ import annotations

import functools

import torch

from vutrain.grad_clip import is_zero_1_2

# Widening casts that a round trip undoes exactly (the all-reduce's dtype and back).
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def use_lean_reduction(optimizer) -> bool:
    """Wrap a ZeRO-1/2 optimizer's reduction methods in place; False for any other optimizer."""
    if not is_zero_1_2(optimizer):
        return False
    _wrap_copy_back(optimizer)
    if _one_rank_without_extras(optimizer):
        if optimizer.partition_gradients:
            _remove_gradient_hooks(optimizer)
        else:
            _wrap_reduce_gradients(optimizer)
    return True


def _wrap_copy_back(optimizer) -> None:
    original = optimizer.allreduce_and_copy
    if getattr(original, "_vutrain_lean", False):
        return

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

    allreduce_and_copy._vutrain_lean = True
    optimizer.allreduce_and_copy = allreduce_and_copy


def _wrap_reduce_gradients(optimizer) -> None:
    original = optimizer.reduce_gradients
    if getattr(original, "_vutrain_lean", False):
        return

    @functools.wraps(original)
    def reduce_gradients(pipeline_parallel=False):
        if pipeline_parallel:  # DeepSpeed's pipeline engine drives its own buckets
            return original(pipeline_parallel=pipeline_parallel)
        # What DeepSpeed runs after filing every parameter: the (identity) reduction of an empty
        # bucket and the flat gradient partition the step reads, from the parameters' gradients.
        return optimizer.overlapping_partition_gradients_reduce_epilogue()

    reduce_gradients._vutrain_lean = True
    optimizer.reduce_gradients = reduce_gradients


def _remove_gradient_hooks(optimizer) -> None:
    """One-rank ZeRO-2: drop DeepSpeed's per-parameter gradient hooks (kept for nothing else
    under :func:`_one_rank_without_extras`); ``_vutrain_no_grad_hooks`` records it."""
    handles = getattr(optimizer, "_grad_acc_hooks", None)
    if handles is None:  # a DeepSpeed that keeps them elsewhere: leave them
        return
    for handle in handles:
        handle.remove()
    handles.clear()
    optimizer._vutrain_no_grad_hooks = True


def _one_rank_without_extras(optimizer) -> bool:
    """ZeRO-1/2 on one data-parallel rank, with none of the features whose bookkeeping the
    per-parameter filing does (overlap, contiguous buckets, offload, fp32 accumulation, MoE, ...)."""
    import deepspeed.comm as dist

    groups = [optimizer.dp_process_group, *getattr(optimizer, "real_dp_process_group", [])]
    if any(dist.get_world_size(group=g) != 1 for g in groups):
        return False
    return not (
        optimizer.overlap_comm
        or optimizer.contiguous_gradients
        or optimizer.cpu_offload
        or getattr(optimizer, "zenflow", False)
        or getattr(optimizer, "use_grad_accum_attribute", False)
        or getattr(optimizer, "has_moe_layers", False)
        or getattr(optimizer, "sequence_parallel_size", 1) != 1
    )


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
