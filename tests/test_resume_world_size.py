"""Resume on another world size with real DeepSpeed engines on CPU ranks (gloo).

Engine level (ZeRO-1, 2, 3, each with and without LoRA): a checkpoint written by
``checkpoint.save_checkpoint`` at world 2 is loaded by ``checkpoint.load_checkpoint`` at world 1
and 4 (and one written at world 1 at world 2); every trainable parameter's full fp32 value and
Adam moments, every frozen parameter, the optimizer step, the LR and the global step equal the
saved ones exactly. End to end (the deepspeed launcher, then a plain ``python`` run): a run
checkpointed by 2 ranks resumes on 1 rank, refuses a changed global batch with a one-line error,
keeps it with ``train.global_batch_size``, reaches its last step, and the sample keys drawn over
the epoch hold each sample exactly once.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from torch import nn
from zero_engines import full_state, small_engine

import train_runner as tr
from helpers_dist import run_distributed

ALL_CASES = [(stage, lora) for stage in (1, 2, 3) for lora in (False, True)]  # (ZeRO stage, LoRA)
# 4 ranks on 2 cores are slow: each stage once there, LoRA on some, and the rest at world 1 and 2.
CASES_TO = {1: ALL_CASES, 4: [(1, True), (2, False), (3, True)], 2: [(1, False), (2, True), (3, False)]}
GLOBAL_BATCH = 4
pytestmark = pytest.mark.slow


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.b(torch.tanh(self.a(x)))).pow(2).mean()


def _engine(stage: int, lora: bool, world: int):
    torch.manual_seed(0)
    module = _Tiny()
    if lora:  # frozen base weights plus trainable adapters, as model.lora.enabled builds them
        from peft import LoraConfig, get_peft_model

        module = get_peft_model(module, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    micro = 1 if world == 4 else 2
    return small_engine(module, stage, world, micro, grad_accum=GLOBAL_BATCH // (micro * world))


def _save(rank, world, run_dir, cases):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    saved = {}
    for stage, lora in cases:
        engine = _engine(stage, lora, world)
        torch.manual_seed(100 + rank)
        for _ in range(3 * engine.gradient_accumulation_steps()):
            engine.backward(engine(torch.randn(engine.train_micro_batch_size_per_gpu(), 8)))
            engine.step()
        ckpt.save_checkpoint(
            engine,
            os.path.join(run_dir, f"z{stage}_{lora}"),
            3,
            {"step": 3, "data": {"rank": rank}},
            rank,
            keep=1,
        )
        saved[(stage, lora)] = full_state(engine)
    return saved


def _load(rank, world, run_dir, cases):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    loaded = {}
    for stage, lora in cases:
        engine = _engine(stage, lora, world)
        target = ckpt.resolve_resume("auto", os.path.join(run_dir, f"z{stage}_{lora}"))
        state = ckpt.load_checkpoint(engine, *target, rank=rank)
        loaded[(stage, lora)] = (full_state(engine), state)
    return loaded


def _assert_equal(saved: dict, loaded: dict, old_world: int) -> None:
    for key, (got, state) in loaded.items():
        want = saved[key]
        assert state["step"] == 3 and state["data"] == {"ranks": [{"rank": r} for r in range(old_world)]}
        assert got.keys() == want.keys()
        for name in want:
            if name.startswith("_"):
                assert got[name] == want[name], (key, name)
            else:
                for a, b in zip(got[name], want[name], strict=True):
                    assert torch.equal(a, b), (key, name)


def test_optimizer_steps_move_to_their_parameters_device():
    """DeepSpeed's universal loader leaves `step` a CPU tensor; the fused CUDA AdamW would read it
    through a device pointer. The meta device stands in for CUDA."""
    from vutrain.checkpoint_reshape import steps_to_param_devices

    on_device, on_cpu = nn.Parameter(torch.empty(3, device="meta")), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([on_device, on_cpu])
    optimizer.state[on_device]["step"] = torch.tensor(5.0)
    optimizer.state[on_cpu]["step"] = torch.tensor(5.0, dtype=torch.float64)
    steps_to_param_devices(optimizer)
    assert optimizer.state[on_device]["step"].device.type == "meta"
    assert optimizer.state[on_cpu]["step"].dtype == torch.float32 and optimizer.state[on_cpu]["step"] == 5


def test_zero_states_load_exactly_on_other_world_sizes(tmp_path):
    run = str(tmp_path / "w2")
    saved = run_distributed(_save, 2, run, ALL_CASES, init_process_group=False)[0]
    for world in (1, 4):
        loaded = run_distributed(_load, world, run, CASES_TO[world], init_process_group=False)
        for result in loaded:  # every rank gathered the same full state
            _assert_equal(saved, result, 2)
    run = str(tmp_path / "w1")
    saved = run_distributed(_save, 1, run, CASES_TO[2], init_process_group=False)[0]
    for result in run_distributed(_load, 2, run, CASES_TO[2], init_process_group=False):
        _assert_equal(saved, result, 1)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """96 training samples in 8 shards of 12: one epoch is 6 steps of a global batch of 16."""
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("reshape_e2e")
    return write_synthetic(str(out), num_samples=96, shard_size=12, image_size=32, val_samples=16, seed=1)


def _all_keys(spec: str) -> list[str]:
    import tarfile

    from vutrain.data.shards import expand_shards

    keys = []
    for url in expand_shards(spec):
        with tarfile.open(url) as tar:
            keys += sorted({f"{os.path.basename(url)}/{m.name.split('.')[0]}" for m in tar.getmembers()})
    return keys


def _logged_keys(prefix: str) -> list[str]:
    keys = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as fh:
            keys += fh.read().split()
    return keys


def test_run_on_two_ranks_resumes_on_one_and_finishes_the_epoch(small_shards, tmp_path, monkeypatch):
    from vutrain.data.epoch_remainder import SAMPLE_LOG_ENV

    run_dir = str(tmp_path / "run")
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path / "keys"))
    common = dict(train__micro_batch_size=8, data__shuffle_buffer=8, eval__batch_size=16)
    first = tr.run("deepspeed", tr.base_overrides(small_shards, run_dir, 2, **common), ranks=2)
    assert first.returncode == 0, tr.describe(first)
    before = _logged_keys(str(tmp_path / "keys"))
    assert len(before) == 2 * 16

    refused = tr.run("python", tr.base_overrides(small_shards, run_dir, 6, **common))
    assert refused.returncode == 2, tr.describe(refused)
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("config error: world 2 -> 1 changes the global batch 16 -> 8")
    assert "set train.grad_accum_steps=2" in last_line

    # train.global_batch_size derives train.grad_accum_steps=2 on 1 rank (as a SLURM requeue would)
    overrides = tr.base_overrides(small_shards, run_dir, 6, train__global_batch_size=16, **common)
    resumed = tr.run("python", overrides)
    assert resumed.returncode == 0, tr.describe(resumed)
    assert sorted(tr.losses(run_dir)) == list(range(1, 7))
    keys = _logged_keys(str(tmp_path / "keys"))
    assert len(keys) == len(set(keys)) == 96, "a sample was drawn twice, or not at all, in the epoch"
    assert sorted(keys) == sorted(_all_keys(small_shards["train_shards"]))


def _zero0_state(engine) -> dict:
    """ZeRO-0 keeps whole parameters and the plain torch optimizer's state on every rank."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = {}
    for name, p in engine.module.named_parameters():
        state = optimizer.state[p]
        out[name] = [p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
    out["_adam_steps"] = sorted({float(s["step"]) for s in optimizer.state.values()})
    out["_lr"], out["_global_steps"] = engine.get_lr(), engine.global_steps
    return out


def _save_zero0(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(0, False, world)
    torch.manual_seed(100 + rank)
    for _ in range(3 * engine.gradient_accumulation_steps()):
        engine.backward(engine(torch.randn(engine.train_micro_batch_size_per_gpu(), 8)))
        engine.step()
    # Pre-empted between two logging steps, before its step's eval (trainer.state_dict).
    state = {"step": 3, "data": {"rank": rank}, "interval": [5.25, 2.0, 1.0], "eval_pending": True}
    ckpt.save_checkpoint(engine, run_dir, 3, state, rank, keep=1)
    return _zero0_state(engine)


def _load_zero0(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(0, False, world)
    state = ckpt.load_checkpoint(engine, *ckpt.resolve_resume("auto", run_dir), rank=rank)
    return _zero0_state(engine), state


def test_zero0_checkpoint_resumes_on_another_world_size(tmp_path):
    """train.zero_stage=0 (fp32) writes no optimizer shards, so DeepSpeed's universal conversion
    has nothing to read (FileNotFoundError: can't find *_optim_states.pt); the tag loads as it is."""
    run = str(tmp_path / "z0")
    saved = run_distributed(_save_zero0, 2, run, init_process_group=False)[0]
    (got, state), *_ = run_distributed(_load_zero0, 1, run, init_process_group=False)
    assert state["step"] == 3 and state["data"] == {"ranks": [{"rank": 0}, {"rank": 1}]}
    # The logging interval's sums and the owed eval carry over too (tests/test_resume_mid_interval.py).
    assert state["interval"] == [5.25, 2.0, 1.0] and state["eval_pending"] is True
    assert got.keys() == saved.keys()
    for name, want in saved.items():
        if name.startswith("_"):
            assert got[name] == want, name
        else:
            for a, b in zip(got[name], want, strict=True):
                assert torch.equal(a, b), name


def test_reshape_in_a_run_dir_whose_name_has_regex_characters(tmp_path):
    """DeepSpeed's ds_to_universal turns its folder paths into regular expressions unescaped: a
    run directory named like "vit+tags(2)" failed the conversion ("Cannot parse dp_rank")."""
    run = str(tmp_path / "vit+tags(2)")
    cases = [(1, False), (3, False)]
    saved = run_distributed(_save, 2, run, cases, init_process_group=False)[0]
    for result in run_distributed(_load, 1, run, cases, init_process_group=False):
        _assert_equal(saved, result, 2)
