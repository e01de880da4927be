"""Non-finite micro-batches decided on the device: zeroed on every rank, never a host sync.

Every micro-batch runs forward, backward and `engine.step()` on every rank, so DeepSpeed's
gradient-accumulation boundary never shifts. After the loss, one all-reduce of a 3-element tensor
on the engine's device tells every rank whether any rank's loss is non-finite (plus the loss sum
and any stop request); the result stays on the device:

* the loss handed to backward is masked to 0 (`masked_fill`, whose gradient is exactly 0 even
  where the loss is NaN), and
* a hook on every trainable parameter masks its gradient to 0, because NaN activations inside the
  model would otherwise turn 0 x NaN into NaN gradients. Where a skipped micro-batch is a skipped
  step (one micro-batch per step, bf16 ZeRO-1/2), the trainer instead has the optimizer zero the
  flat gradients once at the step (`grad_clip.mask_at_step`) and removes these hooks.

A skipped micro-batch thus contributes exactly zero to the step's gradient, as if its loss were
0 on every rank. A step whose micro-batches were all skipped still calls the optimizer with a zero
gradient (AdamW's momentum and weight decay still move the weights a little).

With GradCache (one loss over the step's k micro-batches) `agree(loss, micro_batches=k)` counts
the step's k micro-batches, skipped or good, as plain accumulation's k agreements do: the
`train/nonfinite_skipped` metric and the streak that `train.max_nonfinite_steps` limits count
micro-batches in both (GradCache counted one per step: the same limit allowed k times as many
non-finite steps, and the metric said 1 micro-batch where k were skipped).

The running statistics (loss sum, good and skipped micro-batches, skipped in a row, stop
requests) accumulate on the device and are read on the host only when the trainer asks
(`read()`, on logging steps): one sync per logged step. So does `zeroed_steps`, the count of
optimizer steps whose gradients the optimizer zeroed for a NaN or inf gradient under finite losses
(grad_clip.py's zeroing paths add to it on the device; it is checkpointed with the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vutrain.distributed import all_reduce


@dataclass
class GuardStats:
    """Host copy of the statistics since the last `read()` (in_row and stop: current values)."""

    loss_sum: float
    good: int
    skipped: int
    in_row: int
    stop: bool
    zeroed_steps: int = 0
    """Optimizer steps zeroed for a NaN/inf gradient under finite losses, since the run started."""
    zeroed_new: int = 0
    """How many of those came since the previous `read()` (the trainer warns when any did)."""

    @property
    def mean_loss(self) -> float:
        """Mean over the good micro-batches (of all ranks) since the last read; NaN if none."""
        return self.loss_sum / self.good if self.good else float("nan")


class NonFiniteGuard:
    """Device-side agreement about non-finite losses, and the gradient mask that applies it."""

    def __init__(self, module: nn.Module, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.skip = torch.zeros((), dtype=torch.bool, device=device)
        self._stop = torch.zeros((), dtype=torch.float32, device=device)
        # loss sum, good micro-batches, skipped micro-batches, skipped in a row, stop requests
        self._stats = torch.zeros(5, dtype=torch.float64, device=device)
        self.zeroed_steps = torch.zeros((), dtype=torch.float64, device=device)  # grad_clip.py adds
        self._zeroed_reported = 0
        self._hooks = [p.register_hook(self._mask) for p in module.parameters() if p.requires_grad]

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.skip, 0)

    def request_stop(self) -> None:
        """Ask every rank to stop (a signal arrived here); agreed at the next `agree`."""
        self._stop.fill_(1.0)

    def agree(self, loss: torch.Tensor, micro_batches: int = 1) -> torch.Tensor:
        """All ranks agree whether this loss is skipped; returns the loss to backpropagate.

        loss: this rank's scalar loss, over `micro_batches` micro-batches (GradCache: the step's
        k), each counted as one good or skipped micro-batch. The returned loss is `loss`, or 0 with
        a zero gradient when any rank's loss is non-finite. One all-reduce on the device, no host read.
        """
        value = loss.detach().float().reshape(())
        finite = torch.isfinite(value)
        flags = torch.stack(
            [torch.where(finite, value, torch.zeros_like(value)), (~finite).float(), self._stop]
        )
        all_reduce(flags)
        bad = flags[1] > 0
        self.skip.copy_(bad)
        good = (~bad).double()
        mean_loss = flags[0].double() / self.world_size * good
        self._stats[:3] += torch.stack([mean_loss, good, 1 - good]) * micro_batches
        self._stats[3] = (self._stats[3] + micro_batches) * (1 - good)
        self._stats[4] = torch.maximum(self._stats[4], (flags[2] > 0).double())
        return loss.masked_fill(bad, 0)

    def step_skipped(self, micro_batches: int) -> torch.Tensor:
        """Whether the last optimizer step's `micro_batches` micro-batches were all skipped (a 0-dim
        bool on the device, no host read): the skipped-in-a-row count covers at least one step.
        Such a step's logged gradient norm reads inf whichever path zeroed it (grad_norm.py)."""
        return self._stats[3] >= micro_batches

    def read(self) -> GuardStats:
        """Copy the statistics to the host (the one sync) and restart the per-interval sums."""
        *stats, zeroed = torch.cat([self._stats, self.zeroed_steps.reshape(1)]).tolist()
        loss_sum, good, skipped, in_row, stop = stats
        self._stats[:3] = 0
        zeroed_new, self._zeroed_reported = int(zeroed) - self._zeroed_reported, int(zeroed)
        return GuardStats(
            loss_sum=loss_sum,
            good=int(good),
            skipped=int(skipped),
            in_row=int(in_row),
            stop=stop > 0,
            zeroed_steps=int(zeroed),
            zeroed_new=zeroed_new,
        )

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the count of skipped micro-batches in a row, and the logging
        interval's loss sum and micro-batch counts so far, so that a run resumed between two
        logging steps (train.log_every > 1) logs the same mean at the next one as an uninterrupted
        run (float64 survives the checkpoint's JSON exactly); and the zeroed-step count with how much
        of it the logs reported, so a resumed run counts and warns as an uninterrupted one."""
        loss_sum, good, skipped, in_row, _ = self._stats.tolist()
        return {
            "nonfinite_in_row": int(in_row),
            "interval": [loss_sum, good, skipped],
            "zeroed_grad_steps": [int(self.zeroed_steps.item()), self._zeroed_reported],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict()` kept (checkpoints written before 2026-12-05 have no interval)."""
        self._stats[3] = float(state.get("nonfinite_in_row", 0))
        if state.get("interval") is not None:
            self._stats[:3] = torch.tensor(state["interval"], dtype=torch.float64)
        zeroed, reported = state.get("zeroed_grad_steps") or (0, 0)  # none before 2026-12-06
        self.zeroed_steps.fill_(float(zeroed))
        self._zeroed_reported = int(reported)

    def remove(self) -> None:
        """Detach the gradient hooks (the step masks the gradients instead, or the run is over)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
