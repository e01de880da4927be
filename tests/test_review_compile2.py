"""train.compile with GradCache, LoRA and a locked tower: the towers stay compiled, every eval too.

GradCache calls the model in several ways per micro-batch (no-grad first pass, replay with autograd;
with model.lock_image the image tower alone without autograd, the text tower alone, then the text
tower again with autograd), and eval adds its own batch sizes (a short last batch: 50 held-out
samples in batches of 24). Each is a Dynamo graph signature. With train.compile_scope=layers every
block of both towers is one code object, whose graphs count against one Dynamo recompile limit:
past it Dynamo runs the blocks eagerly, with a single log warning, for the rest of the run.
The aot_eager backend: Dynamo's capture and AOTAutograd's graphs, run by eager kernels.
"""

from __future__ import annotations

import logging

import pytest
import torch

import inprocess_trainer

RUN = {
    "train__grad_accum_steps": 2,
    "train__accumulation": "gradcache",
    "train__precision": "fp32",
    "train__compile_backend": "aot_eager",
    "train__compile_scope": "layers",
    "model__lora__enabled": "true",
    "model__lora__dropout": "0",
}


@pytest.fixture(scope="module")
def short_last_eval_batch(tmp_path_factory):
    """256 training samples, 50 held out: eval batches of 24, 24 and 2."""
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("val50")
    return write_synthetic(str(out), num_samples=256, shard_size=64, val_samples=50, seed=0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(shards, run_dir, compiled, **extra):
    """4 steps, an eval every 2: (GradCache losses, new graphs per step, Dynamo's warnings)."""
    from torch._dynamo.utils import counters

    import vutrain.gradcache as gradcache

    losses, graphs_per_step = [], []

    def record(trainer):
        train_step, cache_forward = trainer.train_step, gradcache.GradCache.forward

        def step():
            before = counters["stats"]["unique_graphs"]
            out = train_step()
            graphs_per_step.append(counters["stats"]["unique_graphs"] - before)
            return out

        def forward(cache, micro_batches):
            loss = cache_forward(cache, micro_batches)
            losses.append(float(loss))
            return loss

        trainer.train_step = step
        monkey.setattr(gradcache.GradCache, "forward", forward)

    torch._dynamo.reset()  # no graphs of earlier tests in this process count against the limit
    counters.clear()
    records, dynamo_log = _Records(), logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(records)
    monkey = pytest.MonkeyPatch()
    try:
        inprocess_trainer.train(
            shards, run_dir, 4, on_trainer=record, train__compile=str(compiled).lower(), **RUN, **extra
        )
    finally:
        monkey.undo()
        dynamo_log.removeHandler(records)
    assert dict(counters["graph_break"]) == {}
    return losses, graphs_per_step, records.messages


def _limit_hits(messages):
    return [m.splitlines()[0] for m in messages if "recompile_limit" in m]


def test_locked_image_tower_compiled_matches_eager_and_compiles_only_once(
    short_last_eval_batch, tmp_path, single_process
):
    eager, _, _ = _train(short_last_eval_batch, str(tmp_path / "eager"), False, model__lock_image="true")
    losses, graphs_per_step, messages = _train(
        short_last_eval_batch, str(tmp_path / "compiled"), True, model__lock_image="true"
    )
    torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-5)
    # The first step captures the image blocks without autograd, the text blocks without it, and
    # with it (their first block's input needs no gradient under LoRA, the others' does); the
    # later steps reuse them (the evals between them compile their own, outside the steps).
    assert graphs_per_step[0] >= 3 and graphs_per_step[1:] == [0, 0, 0], graphs_per_step
    assert _limit_hits(messages) == []


def test_gradcache_lora_blocks_stay_compiled_through_eval(short_last_eval_batch, tmp_path, single_process):
    """Both towers trainable: 6 block signatures in training, 3 more in eval (batch 24, then a
    dynamic batch for the last batch of 2 and the class prompts). Before, the ninth hit Dynamo's
    default limit of 8: "torch._dynamo hit config.recompile_limit (8)", and eval's text blocks ran
    eagerly in every eval of the run."""
    _, graphs_per_step, messages = _train(short_last_eval_batch, str(tmp_path / "compiled"), True)
    assert graphs_per_step[1:] == [0, 0, 0], graphs_per_step
    assert _limit_hits(messages) == []
