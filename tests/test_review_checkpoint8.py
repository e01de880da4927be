"""Checkpoints review 8: resume on 3 ranks (an odd world: ZeRO pads its partitions), pruning.

Real DeepSpeed engines on CPU gloo ranks; a checkpoint written by 2 ranks is loaded by 3 at
ZeRO-1, 2 and 3, and every parameter's fp32 value, Adam moments and step equal the saved ones.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from zero_engines import full_state, small_engine

from helpers_dist import run_distributed

GLOBAL_BATCH = 6
STAGES = (1, 2, 3)


class _Odd(nn.Module):
    """Parameter counts that no world of 2 or 3 divides evenly: ZeRO pads the last partition."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def _engine(stage: int, world: int):
    torch.manual_seed(0)
    return small_engine(_Odd(), stage, world, micro=GLOBAL_BATCH // world)


def _save(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    saved = {}
    for stage in STAGES:
        engine = _engine(stage, world)
        torch.manual_seed(100 + rank)
        for _ in range(3):
            engine.backward(engine(torch.randn(engine.train_micro_batch_size_per_gpu(), 7)))
            engine.step()
        ckpt.save_checkpoint(
            engine, os.path.join(run_dir, f"z{stage}"), 3, {"step": 3, "data": {"rank": rank}}, rank, keep=1
        )
        saved[stage] = full_state(engine)
    return saved


def _load(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    loaded = {}
    for stage in STAGES:
        engine = _engine(stage, world)
        target = ckpt.resolve_resume("auto", os.path.join(run_dir, f"z{stage}"))
        state = ckpt.load_checkpoint(engine, *target, rank=rank)
        loaded[stage] = (full_state(engine), state)
    return loaded


@pytest.mark.slow
def test_two_ranks_resume_exactly_on_three_at_every_zero_stage(tmp_path):
    run = str(tmp_path / "w2")
    saved = run_distributed(_save, 2, run, init_process_group=False)[0]
    for result in run_distributed(_load, 3, run, init_process_group=False):
        for stage, (got, state) in result.items():
            want = saved[stage]
            assert state["step"] == 3
            assert got.keys() == want.keys()
            for name in want:
                if name.startswith("_"):
                    assert got[name] == want[name], (stage, name)
                else:
                    for a, b in zip(got[name], want[name], strict=True):
                        assert torch.equal(a, b), (stage, name)


def _checkpoint_entries(ckpt_dir: str) -> list[str]:
    """The tags, .tmp folders and `latest` (DeepSpeed also drops its zero_to_fp32.py there)."""
    return sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_") or n == "latest")


def _rerun_after_a_full_disk(rank, world, run_dir):
    """Three checkpoints kept (keep 3), a pre-emption save that failed on a full disk (its partial
    .tmp of another step), then a rerun with keep 1: what the checkpoints folder holds while
    DeepSpeed writes the new checkpoint, and after."""
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(1, world)
    for step in (2, 4, 6):
        ckpt.save_checkpoint(engine, run_dir, step, {"step": step, "data": {}}, rank, keep=3)
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    partial = os.path.join(ckpt_dir, ckpt.tag_for(7) + ckpt.TMP_SUFFIX)
    os.makedirs(partial)
    with open(os.path.join(partial, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"\0" * 4096)
    at_write = []
    write = engine.save_checkpoint

    def recording_write(*args, **kwargs):
        at_write.append(_checkpoint_entries(ckpt_dir))
        return write(*args, **kwargs)

    engine.save_checkpoint = recording_write
    ckpt.save_checkpoint(engine, run_dir, 8, {"step": 8, "data": {}}, rank, keep=1)
    return at_write, _checkpoint_entries(ckpt_dir)


def test_a_lowered_keep_and_a_failed_saves_tmp_free_their_space_before_the_next_write(tmp_path):
    """The full-disk error says to free space or lower train.keep_checkpoints and rerun: before,
    the rerun pruned only after its save was complete, so it failed on the same full disk."""
    at_write, after = run_distributed(
        _rerun_after_a_full_disk, 1, str(tmp_path / "run"), init_process_group=False
    )[0]
    assert at_write == [["latest", "step_00000006", "step_00000008.tmp"]]
    assert after == ["latest", "step_00000008"]
