"""Optimizer settings across a resume, with real DeepSpeed engines (`vutrain.engine.build_engine`)
on one CPU rank (gloo), and through a world-1 Trainer in this process (tests/inprocess_trainer.py).

A checkpoint restores the training state (the schedule's step, Adam's moments) but not the run's
settings: a run resumed with a lower `train.lr` (what the non-finite-loss error advises) or another
`train.weight_decay` trains with them, while an unchanged config resumes bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from spawn_scenarios import result, run_in_turn, selected
from torch import nn

from helpers_dist import run_distributed
from inprocess_trainer import train


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.proj(x))).pow(2).mean()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(step)) * 3


def _resumes(rank: int, world: int, stage: int, ckpt_dir: str) -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    cfg = TrainConfig(
        micro_batch_size=4, zero_stage=stage, lr=0.05, warmup_steps=2, max_steps=6, weight_decay=0.3
    )

    def steps(cfg, start: int, stop: int, load: bool = False, save: bool = False) -> dict:
        torch.manual_seed(0)
        engine = build_engine(_Tiny(), cfg, world, torch.device("cpu"))
        if load:
            engine.load_checkpoint(ckpt_dir, tag="t")
        lrs = []
        for step in range(start, stop):
            lrs.append(engine.get_lr()[0])
            engine.backward(engine(_batch(step)))
            engine.step()
        if save:
            engine.save_checkpoint(ckpt_dir, tag="t")
        groups = engine.optimizer.param_groups
        weights = [p.detach().clone() for p in engine.module.parameters()] if stage < 3 else None
        return {"lrs": lrs, "weight_decay": [g["weight_decay"] for g in groups], "weights": weights}

    whole = steps(cfg, 0, 6)
    steps(cfg, 0, 3, save=True)
    same = steps(cfg, 3, 6, load=True)
    changed = steps(dataclasses.replace(cfg, lr=0.005, weight_decay=0.01), 3, 6, load=True)
    return {"whole": whole, "same": same, "changed": changed}


def _json_optimizer_groups(rank: int, world: int, path: str) -> list:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    cfg = TrainConfig(micro_batch_size=4, zero_stage=0, weight_decay=0.2, ds_config=path)
    engine = build_engine(_Tiny(), cfg, world, torch.device("cpu"))
    return [(len(g["params"]), g["weight_decay"]) for g in engine.optimizer.param_groups]


JSON_OPTIMIZERS = [
    # Before: 0.2 (train.weight_decay) on the decayed group, as L2 for Adagrad, without a word.
    ({"type": "Adagrad", "params": {"lr": 0.01, "weight_decay": 0.0}}, 0.0),
    ({"type": "Adagrad", "params": {"lr": 0.01, "weight_decay": 0.05}}, 0.05),
    ({"type": "Adagrad", "params": {"lr": 0.01}}, 0.2),  # none given: train.weight_decay
]

# The rank runs of this module, by name: (worker, its extra arguments). They share one spawned rank
# (the `rank_runs` fixture): each spawn paid ~20 s of imports (torch, DeepSpeed) before its first
# engine (a second or two each), once per test.
RUNS = {
    **{f"resume zero{stage}": ("_resumes", (stage,)) for stage in (2, 3)},
    **{f"json optimizer {i}": ("_json_optimizer_groups", ()) for i in range(len(JSON_OPTIMIZERS))},
}


def _run_of(item) -> str | None:
    """The name in RUNS that test `item` reads (None for a test without one)."""
    if item.originalname == "test_resume_trains_with_this_runs_lr_and_weight_decay":
        return f"resume zero{item.callspec.params['stage']}"
    if item.originalname == "test_json_optimizer_keeps_its_own_weight_decay":
        optimizer = item.callspec.params["optimizer"]
        return f"json optimizer {[o for o, _ in JSON_OPTIMIZERS].index(optimizer)}"
    return None


def _runs(rank: int, world: int, tmp: str, names: list[str]) -> dict:
    """Each named run of RUNS in turn (spawn_scenarios.run_in_turn). Each gets its own path under
    `tmp` (a checkpoint directory, or the DeepSpeed config the fixture wrote there)."""

    def run(name):
        worker, args = RUNS[name]
        return globals()[worker](rank, world, *args, os.path.join(tmp, name))

    return run_in_turn(names, run)


@pytest.fixture(scope="module")
def rank_runs(request, tmp_path_factory):
    """The runs the selected tests of this module read, on one spawned rank: {name: result}."""
    names = selected(request, RUNS, _run_of)
    tmp = tmp_path_factory.mktemp("review_optim")
    for i, (optimizer, _) in enumerate(JSON_OPTIMIZERS):
        (tmp / f"json optimizer {i}").write_text(json.dumps({"optimizer": optimizer}))
    return run_distributed(_runs, 1, str(tmp), names, timeout_s=600)[0]


# One worker of pytest-xdist runs them all: the runs are shared through a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("review_optim")


@pytest.mark.slow  # spawns a rank process
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_trains_with_this_runs_lr_and_weight_decay(stage, rank_runs):
    from vutrain.config import TrainConfig
    from vutrain.optim import lr_lambda

    out = result(rank_runs, f"resume zero{stage}")
    whole, same, changed = out["whole"], out["same"], out["changed"]
    assert same["lrs"] == whole["lrs"][3:]  # unchanged config: the schedule resumes exactly
    if stage < 3:
        assert all(torch.equal(a, b) for a, b in zip(same["weights"], whole["weights"]))
    # Before: 0.05 x the schedule and weight decay 0.3, the checkpoint's, whatever train.* said.
    schedule = TrainConfig(warmup_steps=2, max_steps=6)
    assert changed["lrs"] == pytest.approx([0.005 * lr_lambda(s, schedule) for s in range(3, 6)])
    assert changed["weight_decay"] == [0.01, 0.0]  # no decay on norms and biases, as before


@pytest.mark.parametrize("resumed_lr", [1e-3, 1e-4])
def test_resumed_run_logs_and_trains_with_its_own_schedule(resumed_lr, tiny_shards, tmp_path, single_process):
    """A finished 2-step run goes on to 4 steps ("raise train.max_steps to go on"), with the same
    train.lr or a lower one (what the non-finite-loss error advises). The resumed rows' train/lr
    are the new config's schedule from the first resumed step on."""
    from vutrain.config import TrainConfig
    from vutrain.optim import lr_lambda

    run_dir = str(tmp_path / "run")
    common = dict(train__warmup_steps=1, eval__every=0, train__checkpoint_every=2)
    train(tiny_shards, run_dir, 2, train__lr=1e-3, **common)
    train(tiny_shards, run_dir, 4, train__lr=resumed_lr, **common)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if "train/lr" in line]
    schedule = TrainConfig(warmup_steps=1, max_steps=4)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Before: step 3 ran at the checkpoint's LR, the 2-step schedule's end (0.0), and with 1e-4
    # step 4 at 1e-3 x the schedule, while config.yaml said 1e-4.
    expected = [resumed_lr * lr_lambda(s, schedule) for s in (2, 3)]
    assert [r["train/lr"] for r in rows[2:]] == pytest.approx(expected)


@pytest.mark.slow  # spawns a rank process
@pytest.mark.parametrize("optimizer, decay", JSON_OPTIMIZERS)
def test_json_optimizer_keeps_its_own_weight_decay(optimizer, decay, rank_runs):
    from vutrain.config import TrainConfig
    from vutrain.engine import json_weight_decay

    groups = result(rank_runs, f"json optimizer {[o for o, _ in JSON_OPTIMIZERS].index(optimizer)}")
    assert groups == [(2, decay), (4, 0.0)]  # the two weights; biases and norms never decayed
    # Adam(W) takes train.weight_decay (its engine is not built here: DeepSpeed's CPU Adam op
    # compiles for 80 s on a 2-core machine).
    assert json_weight_decay({"type": "AdamW", "params": {}}, TrainConfig(weight_decay=0.2)) == 0.2
