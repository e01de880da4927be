"""Review of resuming with another shape, part 2: the universal copy of a tag (real DeepSpeed
engines on gloo ranks, real files).

- ``python -m vutrain.checkpoint_reshape`` given something that is no convertible tag says so in
  one line and creates nothing; converting a tag again on a full disk keeps the copy it had.
- A ``universal/`` that is not whole (a file cut short) is converted again at the next resume that
  needs it (another world size or train.precision) instead of failing inside DeepSpeed's loader.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from tiny_modules import TwoLayer
from zero_engines import small_engine

from helpers_dist import run_distributed

GLOBAL_BATCH = 4  # micro batch 2: 1 micro-step a step on 2 ranks, 2 on 1
pytestmark = pytest.mark.slow


def _engine(stage: int, precision: str = "fp32"):
    """A ZeRO ``stage`` engine of this world size, of global batch GLOBAL_BATCH."""
    import torch.distributed as dist

    world = dist.get_world_size()
    torch.manual_seed(0)
    return small_engine(TwoLayer(), stage, world, 2, GLOBAL_BATCH // (2 * world), precision)


def _train_and_save(rank, world, run_dir, stage):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(stage)
    torch.manual_seed(10 + rank)
    for _ in range(2 * engine.gradient_accumulation_steps()):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {"rank": rank}}, rank, keep=1)
    return _weights_and_moments(engine) if stage else None  # ZeRO-0 has no ZeRO partitions


def _weights_and_moments(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):  # see tests/test_resume_world_size.py
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    return {
        name: [safe_get_full_fp32_param(p).clone()]
        + [safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq")]
        for name, p in engine.module.named_parameters()
    }


def _tag(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "step_00000002")


def _save_then_convert_twice(rank, world, run_dir):
    """Tags of ZeRO-1 and ZeRO-0, the first converted by the CLI, then converted again on a full
    disk (writes past 100 bytes refused): (the copy's files before, exit code, its files after)."""
    import resource
    import signal

    from vutrain.checkpoint_reshape import main

    _train_and_save(rank, world, os.path.join(run_dir, "z1"), 1)
    _train_and_save(rank, world, os.path.join(run_dir, "z0"), 0)
    tag = _tag(os.path.join(run_dir, "z1"))
    assert main([tag]) == 0
    converted = _universal_files(tag)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
    try:
        code = main([tag])
    finally:  # the result travels back in a file
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return converted, code, _universal_files(tag)


def _universal_files(tag_dir: str) -> dict[str, int]:
    root = os.path.join(tag_dir, "universal")
    return {
        os.path.relpath(p, root): os.path.getsize(p)
        for p in glob.glob(os.path.join(root, "**"), recursive=True)
        if os.path.isfile(p)
    }


def test_the_conversion_cli_says_in_one_line_what_it_cannot_convert(tmp_path, capsys):
    """Before, a mistyped path, the checkpoints folder or a ZeRO-0 tag (which needs no conversion)
    ended in a traceback calling the checkpoint damaged, and a mistyped path was created as an
    empty folder; converting a tag again on a full disk deleted its good universal copy first."""
    from vutrain.checkpoint_reshape import main

    run = str(tmp_path)
    converted, code, after = run_distributed(_save_then_convert_twice, 1, run, init_process_group=False)[0]
    assert converted and all(size > 0 for size in converted.values())
    assert code == 1 and after == converted
    zero1, zero0 = str(tmp_path / "z1"), str(tmp_path / "z0")
    missing = os.path.join(zero1, "checkpoints", "step_00000009")
    cases = {
        missing: "is not a folder: give a checkpoint's step folder",
        os.path.join(zero1, "checkpoints"): "holds no DeepSpeed optimizer files",
        _tag(zero0): "is a ZeRO-0 checkpoint",
    }
    for path, words in cases.items():
        assert main([path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} ") and words in err and err.count("\n") == 1, err
    assert not os.path.exists(missing)
    assert not os.path.exists(os.path.join(_tag(zero0), "universal.tmp"))


def _resume_over_a_damaged_universal_copy(rank, world, run_dir):
    """Saved in fp32, resumed twice in bf16 (through the universal copy), cut short in between."""

    from vutrain import checkpoint as ckpt

    saved = _train_and_save(rank, world, run_dir, 1)
    ckpt.load_checkpoint(_engine(1, "bf16"), *ckpt.resolve_resume("auto", run_dir), rank=rank)  # converts
    moments = sorted(glob.glob(os.path.join(_tag(run_dir), "universal", "zero", "*", "exp_avg.pt")))
    with open(moments[0], "r+b") as fh:  # cut short, as a copy stopped part way leaves it
        fh.truncate(os.path.getsize(moments[0]) // 2)
    engine = _engine(1, "bf16")
    state = ckpt.load_checkpoint(engine, *ckpt.resolve_resume("auto", run_dir), rank=rank)
    return saved, _weights_and_moments(engine), state


def test_a_universal_copy_that_is_not_whole_is_converted_again(tmp_path):
    """A tag's universal/ was reused as it stood: one file of it cut short (a copy converted ahead
    and copied in part way, a crash after the rename) failed every later resume that needs it (on
    another world size or train.precision) inside DeepSpeed's loader. Now its manifest shows the
    damage and the tag is converted again: the fp32 weights and Adam moments come back bit for bit."""
    saved, got, state = run_distributed(
        _resume_over_a_damaged_universal_copy, 1, str(tmp_path / "run"), init_process_group=False
    )[0]
    assert state["step"] == 2 and state["data"] == {"rank": 0}
    assert got.keys() == saved.keys()
    for name, values in saved.items():
        for a, b in zip(got[name], values, strict=True):
            assert torch.equal(a, b), name
