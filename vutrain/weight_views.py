"""ZeRO-1/2's step without re-pointing every weight at the slot it already views.

DeepSpeed's ZeRO-1/2 optimizer keeps each 16-bit weight as a view of its group's flat buffer and
updates the buffer in place (the fp32 partition is copied into it, then all-gathered into it). At
the end of every ``step()`` it still calls ``_update_model_bit16_weights`` for each group ("TODO:
we probably don't need this? just to be safe"), which re-creates the view of every parameter and
assigns ``param.data`` twice: for ViT-B/32's 398 weights about 2 ms of host time per step on the
development CPU, in a batch-256 step that waits on the host on an H200 (issue 9). No kernel runs,
so only the host sees it.

:func:`use_view_check` wraps the method in place: it re-points a group only when one of its
weights no longer views its slot (its device, address or shape differ), so the safety net stays
for whatever replaced a weight's ``data`` or moved the buffer (DeepSpeed's ``offload_states`` and
``reload_states`` move the flat buffers, then call the same method); otherwise it returns after
one address comparison per weight (about 0.16 ms per step for ViT-B/32).
"""

from __future__ import annotations

import functools

from vutrain.grad_clip import is_zero_1_2


def use_view_check(optimizer) -> bool:
    """Wrap a ZeRO-1/2 optimizer's per-step re-pointing of its weights; False for any other."""
    if not is_zero_1_2(optimizer) or not hasattr(optimizer, "_update_model_bit16_weights"):
        return False
    original = optimizer._update_model_bit16_weights
    if getattr(original, "_vutrain_lean", False):
        return True

    @functools.wraps(original)
    def _update_model_bit16_weights(group_index):
        if not views_its_slots(optimizer, group_index):
            original(group_index)

    _update_model_bit16_weights._vutrain_lean = True
    optimizer._update_model_bit16_weights = _update_model_bit16_weights
    return True


def views_its_slots(optimizer, group_index: int) -> bool:
    """Whether every weight of the group already is the view DeepSpeed would make of its slot
    in the flat buffer: the same device, first element's address and shape."""
    flat = optimizer.bit16_groups_flat[group_index]
    base, itemsize, device = flat.data_ptr(), flat.element_size(), flat.device
    for param, meta, offset in zip(
        optimizer.round_robin_bit16_groups[group_index],
        optimizer.round_robin_bit16_meta[group_index],
        optimizer.round_robin_bit16_offsets[group_index],
    ):
        if (
            param.data_ptr() != base + offset * itemsize
            or param.shape != meta.shape
            or param.device != device
        ):
            return False
    return True
