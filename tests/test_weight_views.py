"""ZeRO-1/2's step without re-pointing every weight at the slot it already views
(vutrain/weight_views.py), on real DeepSpeed engines from `vutrain.engine.build_engine` in bf16,
on 1 and 2 real CPU ranks (gloo).

DeepSpeed's own re-pointing (`_update_model_bit16_weights`) is counted at the class, so a call
that skips the wrapper is counted too: none during training steps, the same weights bit for bit
as DeepSpeed's own method, every weight still a view of its slot after each step (the next step's
update reaches the model), and a weight whose `data` was replaced is re-pointed at the step's end.
"""

from __future__ import annotations

import pytest
import torch
from test_param_alignment import _odd_model

from helpers_dist import run_distributed


def _batch(gen: torch.Generator) -> dict:
    return {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen).bfloat16(),
        "input_ids": torch.randint(1, 99, (2, 9), generator=gen),
        "attention_mask": torch.ones(2, 9, dtype=torch.long),
    }


def _step(engine, gen: torch.Generator) -> None:
    img, txt, scale, _ = engine(**_batch(gen))
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float())
    engine.step()


def _train(stage: int, rank: int, check: bool) -> dict:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine
    from vutrain.weight_views import views_its_slots

    calls = []
    deepspeeds = DeepSpeedZeroOptimizer._update_model_bit16_weights

    def counted(self, group_index):
        calls.append(group_index)
        return deepspeeds(self, group_index)

    DeepSpeedZeroOptimizer._update_model_bit16_weights = counted
    try:
        torch.manual_seed(0)
        cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision="bf16", warmup_steps=0)
        engine = build_engine(_odd_model(), cfg, torch.distributed.get_world_size(), torch.device("cpu"))
        opt = engine.optimizer
        wrapped = getattr(opt._update_model_bit16_weights, "_vutrain_lean", False)
        if not check and wrapped:
            opt._update_model_bit16_weights = opt._update_model_bit16_weights.__wrapped__
        groups = range(len(opt.bit16_groups))
        gen = torch.Generator().manual_seed(100 + rank)
        calls.clear()
        views = []
        for _ in range(3):
            _step(engine, gen)
            views.append(all(views_its_slots(opt, g) for g in groups))
        steps_calls = len(calls)
        params = [p.detach().float().clone() for p in engine.module.parameters()]
        # A weight whose data was replaced (no longer the flat buffer's view) is re-pointed by
        # the step's end, so the next step's update reaches it.
        weight = next(p for p in engine.module.parameters() if p.requires_grad and p.dim() == 2)
        weight.data = weight.data.clone()
        broken = all(views_its_slots(opt, g) for g in groups)
        _step(engine, gen)
        repaired = all(views_its_slots(opt, g) for g in groups)
        before = weight.detach().clone()
        _step(engine, gen)
        return {
            "wrapped": wrapped,
            "calls_in_steps": steps_calls,
            "groups": len(groups),
            "views": views,
            "params": params,
            "broken_detected": not broken,
            "repaired": repaired,
            "updated_after_repair": not torch.equal(before, weight.detach()),
        }
    finally:
        DeepSpeedZeroOptimizer._update_model_bit16_weights = deepspeeds


def _compare(rank: int, world: int) -> dict:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    out = {}
    for stage in (1, 2):
        ours, theirs = _train(stage, rank, True), _train(stage, rank, False)
        out[stage] = {
            "ours": {k: v for k, v in ours.items() if k != "params"},
            "deepspeed_calls": theirs["calls_in_steps"],
            "same_weights": all(torch.equal(a, b) for a, b in zip(ours["params"], theirs["params"])),
        }
    return out


def _check(results: list[dict]) -> None:
    for rank, by_stage in enumerate(results):
        for stage, r in by_stage.items():
            ours = r["ours"]
            where = f"rank {rank}, ZeRO-{stage}: {r}"
            assert ours["wrapped"], where
            assert r["same_weights"], where
            assert r["deepspeed_calls"] == 3 * ours["groups"], where  # DeepSpeed: every group, every step
            assert ours["calls_in_steps"] == 0, where
            assert all(ours["views"]), where
            assert ours["broken_detected"] and ours["repaired"] and ours["updated_after_repair"], where


def test_one_rank_step_keeps_the_views_without_re_pointing_them():
    _check(run_distributed(_compare, 1, init_process_group=False, timeout_s=600))


@pytest.mark.slow  # spawns 2 rank processes, 4 small engines each
def test_two_ranks_step_keeps_the_views_without_re_pointing_them():
    _check(run_distributed(_compare, 2, init_process_group=False, timeout_s=600))
