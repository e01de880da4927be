"""Precision review 2: ZeRO-0 resumes under another train.precision (checkpoint_precision.load_zero0).

What the non-finite-loss error suggests: "Lower train.lr, use train.precision=fp32 or bf16". Real
DeepSpeed engines built as the trainer builds them (engine.build_engine), real checkpoints, one
spawned gloo rank running every case (a process start costs seconds of a loaded core). This CPU has
no fp16 kernels and DeepSpeed refuses an fp16 engine here; the fp16 cases tell its CPU accelerator
that fp16 is supported (torch's CPU fp16 matmuls run the few steps they take).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from tiny_modules import TwoLayer

from helpers_dist import run_distributed

LORA = ["q_proj", "v_proj"]


def _cfg(precision: str, grad_accum: int = 1, lr: float = 1e-2, weight_decay: float = 0.1):
    from vutrain.config import TrainConfig

    return TrainConfig(
        max_steps=10, micro_batch_size=2, grad_accum_steps=grad_accum, zero_stage=0, warmup_steps=2,
        lr=lr, weight_decay=weight_decay, precision=precision,
    )  # fmt: skip


def _two_layer(_tokenizer=None, lock: str = ""):
    torch.manual_seed(0)
    module = TwoLayer()
    if lock:  # a frozen layer: a parameter without optimizer state
        for p in getattr(module, lock).parameters():
            p.requires_grad_(False)
    return module


def _clip(tokenizer, targets=LORA, **model):
    from vutrain.config import LoraConfig, ModelConfig
    from vutrain.model import build_model

    torch.manual_seed(0)
    lora = LoraConfig(enabled=bool(targets), r=2, target_modules=list(targets or []))
    return build_model(ModelConfig(preset="tiny", lora=lora, **model), tokenizer)


def _micro_batch(engine, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(p for p in engine.module.parameters() if p.is_floating_point()).dtype
    if isinstance(engine.module, TwoLayer):
        return engine(torch.randn(2, 8, generator=gen, dtype=dtype))
    image, text, scale = engine(
        pixel_values=torch.randn(2, 3, 64, 64, generator=gen).to(dtype),
        input_ids=torch.randint(1, 50, (2, 9), generator=gen),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
    )[:3]
    logits = scale.float() * image.float() @ text.float().T
    labels = torch.arange(2)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _train(engine, steps: int, seed: int) -> None:
    for i in range(steps * engine.gradient_accumulation_steps()):
        engine.backward(_micro_batch(engine, seed + i))
        engine.step()


def _state(engine) -> dict:
    """Each trainable parameter's fp32 master and Adam moments (none before the first step), each
    frozen parameter's value, by name; the Adam steps, LR and global step."""
    optimizer = engine.optimizer
    wrapped = hasattr(optimizer, "fp32_groups")  # 16-bit: DeepSpeed's wrapper around torch AdamW
    inner = optimizer.optimizer if wrapped else optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    frozen = {
        n: [p.detach().float().clone()] for n, p in engine.module.named_parameters() if not p.requires_grad
    }
    out = {"_frozen": sorted(frozen), **frozen}
    for i, group in enumerate(inner.param_groups):
        module_params = optimizer.fp16_groups[i] if wrapped else group["params"]
        for master, param in zip(group["params"], module_params, strict=True):
            moments = [
                inner.state[master][k].clone() for k in ("exp_avg", "exp_avg_sq") if master in inner.state
            ]
            out[names[id(param)]] = [master.detach().clone()] + moments
    out["_adam_steps"] = sorted({float(s["step"]) for s in inner.state.values()})
    out["_lr"], out["_global_steps"] = engine.get_lr(), engine.global_steps
    return out


def _loss_scale(engine):
    config = getattr(engine.optimizer, "loss_scale_config", None)
    return None if config is None else (config.dynamic_loss_scale, config.cur_scale)


def _settings(engine) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]


def _resume(
    rank, world, tokenizer, run_dir, saved, resumed, build=_two_layer, steps=3, accum=1, new=None, **kw
):
    """Train `steps` steps under `saved`, checkpoint, resume under `resumed` (train settings `new`,
    model settings `kw.get("resume_model", kw)`) and take one more step."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from vutrain import checkpoint as ckpt
    from vutrain.config import ConfigError
    from vutrain.engine import build_engine

    deepspeed.init_distributed("gloo")
    type(get_accelerator()).is_fp16_supported = lambda self: True
    resume_model = kw.pop("resume_model", kw)
    engine = build_engine(build(tokenizer, **kw), _cfg(saved, accum), world, torch.device("cpu"))
    _train(engine, steps, seed=1)
    ckpt.save_checkpoint(engine, run_dir, steps, {"step": steps, "data": {}}, rank, keep=1)
    want = _state(engine)
    cfg = _cfg(resumed, accum, **(new or {}))
    resumed_engine = build_engine(build(tokenizer, **resume_model), cfg, world, torch.device("cpu"))
    fresh_scale = _loss_scale(resumed_engine)
    try:
        ckpt.load_checkpoint(resumed_engine, *ckpt.resolve_resume("auto", run_dir, verbose=False), rank=rank)
    except (ckpt.CheckpointError, ConfigError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    got = _state(resumed_engine)
    weights = {n: p.detach().clone() for n, p in resumed_engine.module.named_parameters()}
    out = dict(want=want, got=got, weights=weights, fresh_scale=fresh_scale)
    out.update(scale=_loss_scale(resumed_engine), settings=_settings(resumed_engine))
    _train(resumed_engine, 1, seed=100)  # and it trains on
    out["trained_on"] = resumed_engine.global_steps
    return out


CASES = {
    "fp16->bf16": dict(saved="fp16", resumed="bf16"),
    "bf16->fp16": dict(saved="bf16", resumed="fp16"),
    "fp32->bf16 new lr": dict(saved="fp32", resumed="bf16", new=dict(lr=5e-3, weight_decay=0.05)),
    "bf16->fp32 new lr": dict(saved="bf16", resumed="fp32", new=dict(lr=5e-3, weight_decay=0.05)),
    "fp32->fp32 new lr": dict(saved="fp32", resumed="fp32", new=dict(lr=5e-3, weight_decay=0.05)),
    "bf16->bf16 new lr": dict(saved="bf16", resumed="bf16", new=dict(lr=5e-3, weight_decay=0.05)),
    "lora lock_text accum fp32->bf16": dict(
        saved="fp32", resumed="bf16", build=_clip, accum=2, lock_text=True
    ),
    "lora bf16->fp32": dict(saved="bf16", resumed="fp32", build=_clip, steps=2),
    "lock_image bf16->fp32": dict(saved="bf16", resumed="fp32", build=_clip, targets=None, lock_image=True),
    "frozen layer fp32->bf16": dict(saved="fp32", resumed="bf16", lock="a"),
    "step 0 fp32->bf16": dict(saved="fp32", resumed="bf16", steps=0),
    "step 0 bf16->fp32": dict(saved="bf16", resumed="fp32", steps=0),
    "new lora target fp32->bf16": dict(
        saved="fp32", resumed="bf16", build=_clip, targets=["q_proj"], resume_model=dict(targets=LORA)
    ),
}


def _run_cases(rank, world, tokenizer, base, cases):
    import traceback

    outcomes = {}
    for name, kwargs in cases.items():
        try:
            run_dir = os.path.join(base, name.replace(" ", "_").replace(">", ""))
            outcomes[name] = ("ok", _resume(rank, world, tokenizer, run_dir, **kwargs))
        except Exception:
            outcomes[name] = ("error", traceback.format_exc())
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    tokenizer = train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)
    base = str(tmp_path_factory.mktemp("runs"))
    return run_distributed(_run_cases, 1, tokenizer, base, CASES, init_process_group=False, timeout_s=600)[0]


def _outcome(outcomes, name):
    kind, value = outcomes[name]
    if kind == "error":
        pytest.fail(f"{name} raised in its spawned process:\n{value}", pytrace=False)
    assert "error" not in value, value["error"]
    return value


def _assert_exact(out) -> None:
    """The saved run's fp32 masters, Adam moments and steps, LR and global step, bit for bit; the
    module's weights are the masters in its dtype (frozen ones the saved weights in it: a bf16 run
    holds no fp32 copy of those); and one more step trains."""
    want, got = out["want"], out["got"]
    assert got.keys() == want.keys()
    for name, values in want.items():
        if name in want["_frozen"]:
            weight = out["weights"][name]
            assert torch.equal(weight, values[0].to(weight.dtype)), name
            continue
        if name.startswith("_"):
            assert got[name] == values, name
            continue
        assert len(got[name]) == len(values), name
        for a, b in zip(got[name], values, strict=True):
            assert torch.equal(a, b), name
        weight = out["weights"][name]
        assert torch.equal(weight, values[0].to(weight.dtype)), name
    assert out["trained_on"] == want["_global_steps"] + 1


@pytest.mark.slow  # one spawned rank, a few dozen small engines
@pytest.mark.parametrize("case", ["fp16->bf16", "bf16->fp16"])
def test_fp16_bf16_switch_starts_with_this_runs_loss_scale(outcomes, case):
    """fp16 <-> bf16 at ZeRO-0: both save DeepSpeed's 16-bit wrapper, so DeepSpeed's own load took,
    with the optimizer, the saved loss scale: a bf16 run resumed from fp16 scaled its loss by 2**16
    dynamically, and an fp16 run resumed from bf16 trained with a static scale of 1 (its fp16
    gradients underflow, overflows never rescale). Now this run's fresh scale, the state exact."""
    out = _outcome(outcomes, case)
    assert out["scale"] == out["fresh_scale"], f"loss scale {out['scale']}, fresh {out['fresh_scale']}"
    _assert_exact(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,same", [("fp32->bf16 new lr", "bf16->bf16 new lr"), ("bf16->fp32 new lr", "fp32->fp32 new lr")]
)
def test_precision_switch_keeps_this_runs_lr_and_weight_decay(outcomes, case, same):
    """A switch of train.precision with a lower train.lr and another weight_decay: before, the
    optimizer's param groups came back as saved (the old run's lr for the next step, its weight
    decay for good), unlike a resume at the same precision (engine.keep_settings_on_load). Now both
    give this run's settings and the LR of its schedule at the restored step."""
    out, reference = _outcome(outcomes, case), _outcome(outcomes, same)
    assert out["settings"] == reference["settings"]
    assert [g["weight_decay"] for g in out["settings"]] == [0.05, 0.0]
    assert out["got"]["_lr"] == reference["got"]["_lr"]
    assert out["got"]["_lr"] != out["want"]["_lr"]  # the schedule of train.lr=5e-3 at the same step


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "lora lock_text accum fp32->bf16",
        "lora bf16->fp32",
        "lock_image bf16->fp32",
        "frozen layer fp32->bf16",
        "step 0 fp32->bf16",
        "step 0 bf16->fp32",
    ],
)
def test_precision_switch_restores_the_state_exactly(outcomes, case):
    """LoRA (frozen base weights without optimizer state), a locked tower, gradient accumulation, a
    checkpoint of step 0 (no Adam state yet): the saved fp32 masters, moments, steps, LR and step."""
    _assert_exact(_outcome(outcomes, case))


@pytest.mark.slow
def test_precision_switch_with_a_new_lora_target_says_so_in_one_line(outcomes):
    """A new LoRA target changes the parameters and their order in the optimizer groups: one line
    naming the difference and what to do, never a state loaded into the wrong parameters."""
    kind, value = outcomes["new lora target fp32->bf16"]
    assert kind == "ok", value
    message = value.get("error", "")
    assert message.startswith("ResumeShapeError: ") or message.startswith("CheckpointError: "), value.keys()
    assert "\n" not in message
    assert "parameters of this model are not in the checkpoint" in message and "model.lora" in message
