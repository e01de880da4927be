"""The training step on 2 real CPU ranks (gloo, real DeepSpeed engines, the real Trainer in-process).

Skipping a non-finite micro-batch with train.grad_accum_steps > 1: one rank's second micro-batch
of the first step gets NaN pixels (so the model's activations, not just the loss, are NaN). The
run must end with exactly the parameters of a run in which that micro-batch's loss is multiplied
by 0 on every rank (it "contributes zero"), after the same number of optimizer steps, with
finite weights. Before the fix the skipped micro-batch never reached engine.backward/step, which
moved DeepSpeed's accumulation boundary (fewer optimizer steps, different weights).
"""

from __future__ import annotations

import os

import pytest
import torch
from spawn_scenarios import results_by_rank, run_in_turn, selected

from vutrain.host_reads import HostReads

import train_runner as tr
from helpers_dist import run_distributed

STEPS, ACCUM, POISONED_CALL = 3, 2, 1  # the second micro-batch of the first step


def _trainer(rank: int, shards: dict, run_dir: str, accum: int = ACCUM, **extra):
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    values = dict(
        data__val_shards="",
        data__num_workers=0,
        train__micro_batch_size=8,
        train__grad_accum_steps=accum,
        train__checkpoint_every=0,
        train__resume="never",
        train__warmup_steps=0,
        train__lr=1e-2,
        train__zero_stage=2,
        train__accumulation="plain",  # per-micro-batch losses
    )
    overrides = tr.base_overrides(shards, run_dir, STEPS, **{**values, **extra})
    return Trainer(load_config(tr.TINY, overrides), resolve_dist_env())


def _poison_pixels(trainer, rank: int) -> None:
    """NaN pixels in rank 1's POISONED_CALL-th micro-batch."""
    calls, plain = [0], trainer.next_batch

    def next_batch():
        batch = plain()
        if rank == 1 and calls[0] == POISONED_CALL:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        calls[0] += 1
        return batch

    trainer.next_batch = next_batch


def _zero_loss(trainer) -> None:
    """The reference: the same micro-batch's loss times 0 on every rank (finite, zero gradient)."""
    calls, plain = [0], trainer.forward_loss

    def forward_loss(batch, times):
        loss = plain(batch, times)
        if calls[0] == POISONED_CALL:
            loss = loss * 0
        calls[0] += 1
        return loss

    trainer.forward_loss = forward_loss


def _run_both(rank: int, shards: dict, tmp: str, accum: int = ACCUM, extra=None) -> dict:
    """The run with rank 1's poisoned micro-batch ("nan") and its reference ("zero"), on this rank."""
    out = {}
    for mode in ("nan", "zero"):
        trainer = _trainer(rank, shards, os.path.join(tmp, mode), accum, **(extra or {}))
        (_poison_pixels(trainer, rank) if mode == "nan" else _zero_loss(trainer))
        for _ in range(STEPS):
            trainer.train_step()
            trainer.step += 1
        stats = trainer.read_stats()
        out[mode] = {
            "params": {
                n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad
            },
            "global_steps": trainer.engine.global_steps,
            "skipped": stats.skipped,
            "good": stats.good,
            "in_row": stats.in_row,
            "hooks": len(trainer.guard._hooks),
        }
    return out


# The CPU runs of this module, by name: (worker, its extra arguments). They share one pair of
# spawned ranks (the `rank_runs` fixture): each pair paid ~20 s of imports and process-group start
# before its first step (3 s of training per run), once per test.
BF16_CONFIGS = {
    # the generated config (no overlap, separate gradients), and the shipped ZeRO-2 one
    # (overlap_comm, contiguous gradients, reduce_scatter): NaN through DeepSpeed's buckets
    (1, ""): "bf16 zero1",
    (2, ""): "bf16 zero2",
    (2, os.path.join(tr.REPO, "launch", "ds_configs", "zero2.json")): "bf16 zero2 shipped",
}
RUNS = {
    "accumulation": ("_run_both", ()),
    **{
        name: (
            "_run_both",
            (1, {"train__precision": "bf16", "train__zero_stage": stage, "train__ds_config": ds}),
        )
        for (stage, ds), name in BF16_CONFIGS.items()
    },
    "host reads": ("_reads_per_run", (None,)),
}


def _run_of(item) -> str | None:
    """The name in RUNS that test `item` reads (None for a test without one)."""
    if item.originalname == "test_nonfinite_microbatch_contributes_zero_with_accumulation":
        return "accumulation"
    if item.originalname == "test_nonfinite_step_masked_at_the_step_in_bf16":
        return BF16_CONFIGS[item.callspec.params["stage"], item.callspec.params["ds_config"]]
    if item.originalname == "test_no_host_reads_between_optimizer_steps":
        return "host reads"
    return None


def _runs(rank: int, world: int, shards: dict, tmp: str, names: list[str]) -> dict:
    """Each named run of RUNS in turn on this rank (spawn_scenarios.run_in_turn)."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())

    def run(name):
        worker, args = RUNS[name]
        return globals()[worker](rank, shards, os.path.join(tmp, name), *args)

    return run_in_turn(names, run)


@pytest.fixture(scope="module")
def rank_runs(request, synthetic_shards, tmp_path_factory):
    """The runs the selected tests of this module read, on one pair of spawned ranks: a list by rank
    of {name: result}."""
    names = selected(request, RUNS, _run_of)
    tmp = str(tmp_path_factory.mktemp("train_step"))
    return run_distributed(_runs, 2, synthetic_shards, tmp, names, init_process_group=False, timeout_s=600)


# One worker of pytest-xdist runs them all: the runs are shared through a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("train_step")


@pytest.mark.slow  # spawns 2 rank processes
def test_nonfinite_microbatch_contributes_zero_with_accumulation(rank_runs):
    results = results_by_rank(rank_runs, "accumulation")
    for rank, res in enumerate(results):
        nan, zero = res["nan"], res["zero"]
        assert nan["global_steps"] == zero["global_steps"] == STEPS, f"rank {rank}: optimizer steps"
        assert nan["skipped"] == 1 and nan["good"] == STEPS * ACCUM - 1 and nan["in_row"] == 0
        assert zero["skipped"] == 0
        for name, value in nan["params"].items():
            assert torch.isfinite(value).all(), f"rank {rank}: {name} is not finite"
            torch.testing.assert_close(value, zero["params"][name], msg=f"rank {rank}: {name}")
    torch.testing.assert_close(results[0]["nan"]["params"], results[1]["nan"]["params"])


@pytest.mark.slow  # spawns 2 rank processes
@pytest.mark.parametrize("stage,ds_config", list(BF16_CONFIGS))
def test_nonfinite_step_masked_at_the_step_in_bf16(rank_runs, stage, ds_config):
    """One micro-batch per step in bf16 at ZeRO-1/2: no per-parameter gradient hooks; the skipped
    step (the second; rank 1's pixels NaN, so its activations and gradients are NaN, reduced into
    every rank's partition) is zeroed at the optimizer step, giving exactly the parameters of the
    run whose loss at that step is multiplied by 0 (AdamW still steps, with a zero gradient)."""
    results = results_by_rank(rank_runs, BF16_CONFIGS[stage, ds_config])
    for rank, res in enumerate(results):
        nan, zero = res["nan"], res["zero"]
        assert nan["hooks"] == zero["hooks"] == 0, f"rank {rank}: the per-parameter masks stayed"
        assert nan["global_steps"] == zero["global_steps"] == STEPS
        assert nan["skipped"] == 1 and nan["good"] == STEPS - 1 and zero["skipped"] == 0
        for name, value in nan["params"].items():
            assert torch.isfinite(value).all(), f"rank {rank}: {name} is not finite"
            torch.testing.assert_close(value, zero["params"][name], msg=f"rank {rank}: {name}")


HOST_READ_RUNS = {
    "zero2": {"train__zero_stage": 2},
    "zero3 lora": {"train__zero_stage": 3, "model__lora__enabled": "true"},
    "zero2 align_uniform": {"train__zero_stage": 2, "loss__name": "align_uniform"},
}


def _reads_per_run(rank: int, shards: dict, tmp: str, device_type: str | None, **common) -> dict:
    """Host reads of 2 train_steps by call site, per run of HOST_READ_RUNS. DeepSpeed's optimizer
    step at the accumulation boundary is not counted; on the CPU neither is the batch loading
    (host tensors there; on a GPU it includes the device-side normalisation, so it counts)."""
    out = {}
    for i, (name, extra) in enumerate(HOST_READ_RUNS.items()):
        trainer = _trainer(rank, shards, os.path.join(tmp, str(i)), **common, **extra)
        trainer.train_step()  # the first step builds DeepSpeed's buffers
        assert device_type != "cuda" or trainer.device.type == "cuda"
        reads, engine = HostReads(device_type), trainer.engine
        if device_type is None:
            trainer.next_batch = reads.pause_during(trainer.next_batch)
        engine.step = reads.pause_during(engine.step, engine.is_gradient_accumulation_boundary)
        with reads:
            for _ in range(2):
                trainer.train_step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        out[name] = dict(reads.sites)
    return out


@pytest.mark.slow  # spawns 2 rank processes
def test_no_host_reads_between_optimizer_steps(rank_runs):
    """Issue 9's lean step: nothing in a micro-batch reads a device value on the host. Before the
    fix the text tower's attention mask cost one read per forward (transformers checks on the host
    whether SDPA may ignore it) and align_uniform two more for its logged terms; DeepSpeed's
    grad-norm check at the optimizer step is not counted."""
    for rank, by_run in enumerate(results_by_rank(rank_runs, "host reads")):
        assert by_run == {name: {} for name in HOST_READ_RUNS}, (
            f"rank {rank}: host reads by call site {by_run}"
        )


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_gpu_syncs_between_optimizer_steps(synthetic_shards, tmp_path, single_process):
    """On one GPU in bf16 (world 1, in this process): no read of a CUDA tensor on the host in
    train_step, batch loading and the device-side normalisation included, except in DeepSpeed's
    optimizer step at the accumulation boundary (its gradient-norm check)."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    from inprocess_trainer import DIST_ENV

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    found = _reads_per_run(0, synthetic_shards, str(tmp_path), "cuda", train__precision="bf16")
    assert found == {name: {} for name in HOST_READ_RUNS}, f"GPU syncs by call site: {found}"
