"""train.compile: the model under torch.compile trains as the eager one does, with DeepSpeed.

Checked with the aot_eager backend: Dynamo's capture and AOTAutograd's joint forward/backward
graphs, run by the same eager kernels, so a compiled step must reproduce the eager losses (what
inductor adds, generated kernels, is a GPU speed question: `python -m vutrain.bench --compare
open_clip --compile both`). Before train.compile existed the override was rejected.
"""

from __future__ import annotations

import pytest
import torch

import inprocess_trainer

# The GPU recipe's path: bf16 weights, ZeRO-2, the step zeroes a skipped step's gradients (no
# per-parameter hooks), an eval and a checkpoint every 2 steps.
RECIPE = {"train__precision": "bf16", "train__zero_stage": 2, "train__compile_backend": "aot_eager"}


def _train(shards, run_dir, steps, compiled, seen, scope="layers"):
    def record(trainer):
        forward_loss = trainer.forward_loss

        def recorded(batch, times):
            loss = forward_loss(batch, times)
            seen["losses"].append(float(loss.detach()))
            return loss

        trainer.forward_loss = recorded
        modules = trainer.engine.module.modules()
        seen["compiled"] = sum(getattr(m, "_compiled_call_impl", None) is not None for m in modules)
        seen["param_names"] = sorted(n for n, _ in trainer.engine.module.named_parameters())

    return inprocess_trainer.train(
        shards,
        run_dir,
        steps,
        on_trainer=record,
        train__compile=str(compiled).lower(),
        train__compile_scope=scope,
        **RECIPE,
    )


# layers: each of the tiny preset's 3 + 3 transformer blocks; model: the whole module.
@pytest.mark.parametrize("scope, modules", [("layers", 6), ("model", 1)])
def test_compiled_steps_match_eager_and_resume_an_eager_checkpoint(
    scope, modules, tiny_shards, tmp_path, single_process
):
    from torch._dynamo.utils import counters

    eager = {"losses": []}
    eager_metrics = _train(tiny_shards, str(tmp_path / "eager"), 4, False, eager)
    assert eager["compiled"] == 0

    # Half the run eager, then resumed with train.compile=true from the eager checkpoint at step 2.
    _train(tiny_shards, str(tmp_path / "switch"), 2, False, {"losses": []})
    counters.clear()
    compiled = {"losses": []}
    compiled_metrics = _train(tiny_shards, str(tmp_path / "switch"), 4, True, compiled, scope)

    assert compiled["compiled"] == modules
    # Dynamo captured the towers, or one block per tower that serves all of its blocks (plus
    # eval's signatures), each in one graph.
    assert 1 <= counters["stats"]["unique_graphs"] <= 8
    assert dict(counters["graph_break"]) == {}
    # nn.Module.compile compiles in place: the names a checkpoint or an export carry are unchanged.
    assert compiled["param_names"] == eager["param_names"]
    torch.testing.assert_close(compiled["losses"], eager["losses"][2:], rtol=1e-5, atol=1e-5)
    assert compiled_metrics["eval/zeroshot_top1"] == pytest.approx(eager_metrics["eval/zeroshot_top1"])


def test_compile_config_errors_name_the_fix():
    from vutrain.config import ConfigError, load_config

    base = ["data.train_shards=x.tar", "train.compile=true"]
    with pytest.raises(ConfigError, match="compile_backend='nope' is not valid; choose one of: inductor"):
        load_config("tiny", [*base, "train.compile_backend=nope"])
    with pytest.raises(
        ConfigError, match="train.compile_scope='towers' is not valid; choose one of: layers, model"
    ):
        load_config("tiny", [*base, "train.compile_scope=towers"])
    with pytest.raises(ConfigError, match="ZeRO-3 needs train.compile=false"):
        load_config("tiny", [*base, "train.zero_stage=3"])
    gradcache_dropout = ["train.grad_accum_steps=2", "model.lora.enabled=true", "model.lora.dropout=0.1"]
    with pytest.raises(ConfigError, match="GradCache .* needs model.lora.dropout=0"):
        load_config("tiny", [*base, *gradcache_dropout])
    assert load_config("tiny", [*base, *gradcache_dropout, "train.accumulation=plain"]).train.compile
    assert load_config("tiny", [*base, "train.compile_backend=aot_eager"]).train.compile
    with pytest.raises(ConfigError, match="train.compile_mode='fast' is not valid; choose one of: default"):
        load_config("tiny", [*base, "train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead is an inductor mode"):
        load_config("tiny", [*base, "train.compile_backend=aot_eager", "train.compile_mode=reduce-overhead"])
    assert load_config("tiny", [*base, "train.compile_mode=reduce-overhead"]).train.compile_mode == (
        "reduce-overhead"
    )


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compile_mode_reaches_torch_compile(scope, single_process):
    """train.compile_mode goes to torch.compile in both scopes (through DeepSpeed's engine.compile
    for "model"): a mode inductor does not know is refused there, when the model is compiled."""
    from test_param_alignment import _odd_model

    from vutrain.config import TrainConfig
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.engine import build_engine, compile_model

    init_distributed(resolve_dist_env())
    engine = build_engine(_odd_model(), TrainConfig(micro_batch_size=2), 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no-such-mode"):
        compile_model(engine, scope, "inductor", "no-such-mode")
    assert compile_model(engine, scope, "inductor", "reduce-overhead") == (1 if scope == "model" else 2)
