"""GradCache forwards a locked tower (`model.lock_image` / `lock_text`: weights frozen, still in
train mode) once per micro-batch: its first-pass features are reused instead of a second forward.

Criteria, on the real tiny HF CLIP in fp32 with attention dropout 0.3 in both towers:
- in-process (gradient checkpointing, micro-batches of 3 + 1 + 2 rows), for either locked tower:
  the locked tower runs 3 forwards per step (it ran 6), the loss and every gradient are
  bit-identical to GradCache replaying both towers (today's path), equal a whole-step autograd
  reference with the same dropout masks to fp32 rounding, the locked tower gets no gradient, and
  the RNG ends where the reference leaves it;
- real DeepSpeed engines on 2 gloo ranks at ZeRO-1 and ZeRO-3 (3 steps of 3 micro-batches, so
  ZeRO-3's prefetch trace is recorded, used and invalidated): the losses and weights equal those
  of GradCache replaying both towers bit for bit, with 3 image forwards per step instead of 6;
- the Trainer in this process (lock_image, LoRA with dropout, GradCache of 3 micro-batches,
  ZeRO-3): 3 image-tower forwards per step, not 6.
"""

from __future__ import annotations

import functools

import pytest
import torch
from gradcache_models import SIZES, GradsOnly, micro_batches, tiny_clip, whole_step_reference

from helpers_dist import run_distributed

TOWER_MODULE = {"image": "vision_model", "text": "text_model"}


def _model(locked: str, checkpointing: bool = True):
    return tiny_clip(
        gradient_checkpointing=checkpointing, lock_image=locked == "image", lock_text=locked == "text"
    )


def _tower_forward(model):
    """forward_fn as the trainer's: both towers, or those named in `towers` (the other is None)."""

    def forward(batch, towers=("image", "text")):
        pixels, ids = batch
        return model(pixels if "image" in towers else None, ids if "text" in towers else None)

    return forward


def _count_forwards(model, tower: str) -> list[int]:
    calls = [0]
    module = getattr(model.base, TOWER_MODULE[tower])
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _gradcache(locked: str, skip: bool):
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    model = _model(locked)
    calls = _count_forwards(model, locked)
    torch.manual_seed(5)
    engine = GradsOnly(len(SIZES))
    loss = gradcache_step(
        engine, micro_batches(), _tower_forward(model), ClipLoss(), locked if skip else None
    )
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss, grads, torch.get_rng_state(), calls[0]


@pytest.mark.parametrize("locked", ["image", "text"])
def test_a_locked_tower_runs_once_per_micro_batch_with_bit_identical_gradients(locked):
    loss, grads, rng, forwards = _gradcache(locked, skip=True)
    both_loss, both_grads, both_rng, both_forwards = _gradcache(locked, skip=False)
    expected_loss, expected = whole_step_reference(_model(locked), seed=5)

    assert (forwards, both_forwards) == (len(SIZES), 2 * len(SIZES))
    assert torch.equal(loss, both_loss)
    assert grads.keys() == both_grads.keys() == expected.keys() and any("logit_scale" in k for k in grads)
    assert not any(TOWER_MODULE[locked] in k for k in grads), "the locked tower got a gradient"
    for name, grad in grads.items():
        assert torch.equal(grad, both_grads[name]), name
    assert torch.equal(rng, both_rng) and torch.equal(rng, torch.get_rng_state())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_locked_must_name_a_tower():
    from vutrain.gradcache import GradCache

    with pytest.raises(ValueError, match="None, 'image' or 'text'"):
        GradCache(GradsOnly(2), lambda b: b, lambda *a: a[0].sum(), locked="vision")


def _engine_run(rank: int, world: int, stage: int, skip: bool):
    import deepspeed

    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    model = _model("image", checkpointing=False)
    calls = _count_forwards(model, "image")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 2 * 3 * world,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, config=config, optimizer=torch.optim.AdamW(trainable, lr=0.01)
    )
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    losses = []
    for step in range(3):
        torch.manual_seed(100 + step)
        batches = micro_batches(seed=10 * step + rank, sizes=[2, 2, 2])
        loss = gradcache_step(engine, batches, _tower_forward(engine), loss_fn, "image" if skip else None)
        losses.append(loss)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # ZeRO-3: full tensors
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return torch.stack(losses), state, calls[0]


def _worker(rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {
        (stage, skip): _engine_run(rank, world, stage, skip) for stage in (1, 3) for skip in (False, True)
    }


@functools.cache
def _engine_results():
    return run_distributed(_worker, 2, init_process_group=False, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_real_engines_give_the_same_weights_with_one_forward_of_the_locked_tower(stage):
    for out in _engine_results():
        both_losses, both_state, both_forwards = out[stage, False]
        losses, state, forwards = out[stage, True]
        assert (forwards, both_forwards) == (3 * 3, 3 * 3 * 2)
        assert torch.isfinite(losses).all()
        assert torch.equal(losses, both_losses)
        for name, value in both_state.items():
            assert torch.equal(state[name], value), name
        trained = [n for n in state if "text_model" in n and not torch.equal(state[n], _initial()[n])]
        assert trained, "the text tower did not train"
        assert all(torch.equal(state[n], _initial()[n]) for n in state if "vision_model" in n)


@functools.cache
def _initial() -> dict:
    return {n: p.detach().clone() for n, p in _model("image", checkpointing=False).named_parameters()}


def test_trainer_forwards_the_locked_image_tower_once_per_micro_batch(tiny_shards, tmp_path, single_process):
    """Through the Trainer: model.lock_image, LoRA with dropout (the locked tower's frozen adapters
    still draw masks), GradCache of 3 micro-batches at ZeRO-3, 2 steps, no eval."""
    from inprocess_trainer import train

    counts = []

    def count(trainer):
        counts.append(_count_forwards(trainer.engine.module, "image"))

    train(
        tiny_shards,
        str(tmp_path),
        2,
        on_trainer=count,
        data__val_shards="",
        eval__every=0,
        train__warmup_steps=0,
        train__micro_batch_size=4,
        train__grad_accum_steps=3,
        train__accumulation="gradcache",
        train__zero_stage=3,
        train__checkpoint_every=0,
        model__lock_image="true",
        model__lora__enabled="true",
        model__lora__dropout=0.2,
    )
    assert counts[0][0] == 2 * 3
