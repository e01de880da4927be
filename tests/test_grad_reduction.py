"""ZeRO-1/2's gradient reduction without per-parameter work that reduces nothing
(vutrain/grad_reduction.py), on real DeepSpeed engines from `vutrain.engine.build_engine` in bf16,
1 and 2 real CPU ranks (gloo).

Against DeepSpeed's own methods on the same engine: the same weights bit for bit after
three steps, the gradient copy ops of the backward counted. Two ranks: one multi-tensor copy for
the whole bucket instead of one `copy_` per gradient. One rank: no reduction op at all, and at
ZeRO-1 no parameter filed into a reduce bucket, and at ZeRO-2 no gradient hook left.
With `overlap_comm` the wrapper hands the call to DeepSpeed. And on one rank ZeRO-1 trains what
ZeRO-2 trains.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile

import pytest
import torch
from spawn_scenarios import result, run_in_turn, selected
from test_param_alignment import _odd_model
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_dist import run_distributed


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def _train(stage: int, rank: int, lean: bool, ds_config: str = "", accumulate: int = 1) -> dict:
    from vutrain import grad_reduction
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=2, zero_stage=stage, precision="bf16", warmup_steps=0, ds_config=ds_config,
        grad_accum_steps=accumulate,
    )  # fmt: skip
    remove_hooks = grad_reduction._remove_gradient_hooks
    if not lean:  # DeepSpeed's own ZeRO-2 gradient hooks stay
        grad_reduction._remove_gradient_hooks = lambda optimizer: None
    try:
        engine = build_engine(_odd_model(), cfg, torch.distributed.get_world_size(), torch.device("cpu"))
    finally:
        grad_reduction._remove_gradient_hooks = remove_hooks
    opt = engine.optimizer
    wrapped = {
        name: getattr(getattr(opt, name), "_vutrain_lean", False)
        for name in ("allreduce_and_copy", "reduce_gradients")
    }
    if not lean:  # DeepSpeed's own bound methods
        for name, is_wrapped in wrapped.items():
            if is_wrapped:
                setattr(opt, name, getattr(opt, name).__wrapped__)
    filed = []  # DeepSpeed's per-parameter filing into the reduce bucket, counted
    filing = opt.reduce_independent_p_g_buckets_and_remove_grads
    opt.reduce_independent_p_g_buckets_and_remove_grads = lambda *a: filed.append(1) or filing(*a)
    gen = torch.Generator().manual_seed(100 + rank)
    ops = OpNames()
    for step in range(3 * accumulate):
        img, txt, scale, _ = engine(
            pixel_values=torch.randn(2, 3, 16, 16, generator=gen).bfloat16(),
            input_ids=torch.randint(1, 99, (2, 9), generator=gen),
            attention_mask=torch.ones(2, 9, dtype=torch.long),
        )
        loss = (img.float() @ txt.float().T).diagonal().sum() * scale.float()
        if step == 3 * accumulate - 1:
            with ops:
                engine.backward(loss)
        else:
            engine.backward(loss)
        engine.step()
    params = [p.detach().float().clone() for p in engine.module.parameters()]
    return {
        "wrapped": wrapped,
        "params": params,
        "trainable": sum(p.requires_grad for p in engine.module.parameters()),
        "ops": dict(ops.ops),
        "filed": len(filed),
        "hooks": len(opt._grad_acc_hooks),
    }


def _compare(rank: int, world: int, ds_config: str = "", accumulate: int = 1) -> dict:
    """ZeRO-1 and 2, vutrain's reduction against DeepSpeed's (the process group is up)."""
    out = {}
    for stage in (1, 2):
        ours = _train(stage, rank, True, ds_config, accumulate)
        theirs = _train(stage, rank, False, ds_config, accumulate)
        out[stage] = {
            "wrapped": ours["wrapped"],
            "same_weights": all(torch.equal(a, b) for a, b in zip(ours["params"], theirs["params"])),
            "trainable": ours["trainable"],
            "ours": ours["ops"],
            "deepspeed": theirs["ops"],
            "filed": (ours["filed"], theirs["filed"]),
            "hooks": (ours["hooks"], theirs["hooks"]),
        }
    return out


def _check_equal_weights(results: list[dict]) -> None:
    for rank, by_stage in enumerate(results):
        for stage, r in by_stage.items():
            assert r["wrapped"]["allreduce_and_copy"], f"rank {rank}, ZeRO-{stage}: not wrapped"
            assert r["same_weights"], f"rank {rank}, ZeRO-{stage}: weights differ from DeepSpeed's path"
            # DeepSpeed's path copies every reduced gradient back on its own
            assert r["deepspeed"].get("copy_", 0) >= r["trainable"], r


def _compare_in_a_group(rank: int, world: int) -> dict:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return _compare(rank, world)


def _overlap_comm(rank: int, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ds = os.path.join(tmp, "ds.json")
        with open(ds, "w", encoding="utf-8") as fh:
            json.dump({"zero_optimization": {"overlap_comm": True}}, fh)
        return _compare(rank, world, ds)


def _zero1_and_zero2(rank: int, world: int) -> bool:
    one, two = _train(1, rank, True), _train(2, rank, True)
    return all(torch.equal(a, b) for a, b in zip(one["params"], two["params"]))


# The one-rank runs of this module, by name: (worker, its extra arguments). They share one spawned
# rank (the `one_rank_runs` fixture): each spawn paid ~20 s of imports (torch, DeepSpeed) and
# process-group start before its first engine (a second each), once per test.
ONE_RANK_RUNS = {
    "accumulate 1": ("_compare", ("", 1)),
    "accumulate 2": ("_compare", ("", 2)),
    "overlap_comm": ("_overlap_comm", ()),
    "zero1 and zero2": ("_zero1_and_zero2", ()),
}


def _run_of(item) -> str | None:
    """The name in ONE_RANK_RUNS that test `item` reads (None for a test without one)."""
    if item.originalname == "test_one_rank_skips_the_identity_reduction":
        return f"accumulate {item.callspec.params['accumulate']}"
    if item.originalname == "test_overlap_comm_is_left_to_deepspeed":
        return "overlap_comm"
    if item.originalname == "test_one_rank_zero1_trains_what_zero2_trains":
        return "zero1 and zero2"
    return None


def _runs(rank: int, world: int, names: list[str]) -> dict:
    """Each named run of ONE_RANK_RUNS in turn (spawn_scenarios.run_in_turn)."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())

    def run(name):
        worker, args = ONE_RANK_RUNS[name]
        return globals()[worker](rank, world, *args)

    return run_in_turn(names, run)


@pytest.fixture(scope="module")
def one_rank_runs(request):
    """The one-rank runs the selected tests of this module read, on one spawned rank:
    {name: result}."""
    names = selected(request, ONE_RANK_RUNS, _run_of)
    return run_distributed(_runs, 1, names, init_process_group=False, timeout_s=600)[0]


# One worker of pytest-xdist runs them all: the runs are shared through a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("grad_reduction")


@pytest.mark.slow  # spawns 2 rank processes, 4 small engines each
def test_two_ranks_copy_the_bucket_back_in_one_multi_tensor_copy():
    results = run_distributed(_compare_in_a_group, 2, init_process_group=False, timeout_s=600)
    _check_equal_weights(results)
    for by_stage in results:
        for stage, r in by_stage.items():
            assert r["ours"].get("copy_", 0) <= 2, f"ZeRO-{stage}: {r['ours']}"
            assert r["ours"].get("_foreach_copy_", 0) >= 1, f"ZeRO-{stage}: {r['ours']}"
            # a real reduction: every parameter is filed into the bucket, as DeepSpeed does
            assert not r["wrapped"]["reduce_gradients"], r
            assert r["filed"][0] == r["filed"][1] >= r["trainable"], r
            if stage == 2:  # ZeRO-2's gradient hooks partition: they stay
                assert r["hooks"][0] == r["hooks"][1] >= r["trainable"], r


@pytest.mark.slow  # spawns a rank process
@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_rank_skips_the_identity_reduction(accumulate, one_rank_runs):
    """No reduction op at ZeRO-1 and 2, and no parameter filed into a bucket: at ZeRO-1 DeepSpeed
    files each once per step, at ZeRO-2 in a gradient hook per parameter, which the lean reduction
    removes on one rank; with two micro-batches per step too."""
    results = [result(one_rank_runs, f"accumulate {accumulate}")]
    _check_equal_weights(results)
    for stage, r in results[0].items():
        for op in ("copy_", "_foreach_copy_", "cat", "allreduce_"):
            assert r["ours"].get(op, 0) == 0, f"ZeRO-{stage}: {op} in {r['ours']}"
        assert r["deepspeed"].get("cat", 0) >= 1, r["deepspeed"]
    one, two = results[0][1], results[0][2]
    assert one["wrapped"]["reduce_gradients"] and one["filed"][0] == 0, one
    assert one["filed"][1] >= 3 * one["trainable"], one  # DeepSpeed's: every parameter, every step
    assert not two["wrapped"]["reduce_gradients"], two  # ZeRO-2's engine calls the epilogue itself
    assert two["hooks"][0] == 0 and two["filed"][0] == 0, two
    assert two["hooks"][1] >= two["trainable"], two  # DeepSpeed's: a hook per parameter,
    assert two["filed"][1] >= 3 * accumulate * two["trainable"], two  # filing it in every backward


@pytest.mark.slow  # spawns a rank process
def test_overlap_comm_is_left_to_deepspeed(one_rank_runs):
    results = [result(one_rank_runs, "overlap_comm")]
    _check_equal_weights(results)
    for stage, r in results[0].items():  # handed over: DeepSpeed's copies, one per gradient
        assert r["ours"].get("copy_", 0) >= r["trainable"], f"ZeRO-{stage}: {r['ours']}"
        assert not r["wrapped"]["reduce_gradients"], r
        assert r["hooks"][0] == r["hooks"][1] >= r["trainable"], r  # overlap's bookkeeping: kept


@pytest.mark.slow  # spawns a rank process
def test_one_rank_zero1_trains_what_zero2_trains(one_rank_runs):
    """On one rank ZeRO-1 gives ZeRO-2's weights, bit for bit."""
    assert result(one_rank_runs, "zero1 and zero2") is True


def test_copy_all_matches_a_loop_of_copies():
    from vutrain.grad_reduction import copy_all

    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(n, generator=gen) for n in (1, 7, 33)]
    ours = [torch.empty(n, dtype=torch.bfloat16) for n in (1, 7, 33)]
    copy_all(ours, sources)
    for got, src in zip(ours, sources):
        assert torch.equal(got, src.to(torch.bfloat16))
    copy_all([], [])  # an empty bucket is nothing to do
