"""Review: a failed universal conversion stops every rank at once with the same one line; an
adopted tokenizer holds only the resumed run's files (real DeepSpeed engines on gloo ranks, real
files, real tokenizers)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from vutrain import checkpoint as ckpt
from vutrain.data.tokenizer import train_bpe_tokenizer

from helpers_dist import run_distributed

GLOBAL_BATCH = 4


def _engine(world: int):
    from tiny_modules import TwoLayer

    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=GLOBAL_BATCH // (2 * world), zero_stage=1)
    return build_engine(TwoLayer(), cfg, world, torch.device("cpu"))


def _save_one_rank(rank: int, world: int, run_dir: str) -> None:
    engine = _engine(world)
    for _ in range(engine.gradient_accumulation_steps()):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 1, {"step": 1, "data": {"rank": rank}}, rank, keep=1)


def _load_and_report(rank: int, world: int, run_dir: str) -> tuple[str, str]:
    """(exception type, message) that load_checkpoint raised on this rank."""
    engine = _engine(world)
    target = ckpt.resolve_resume("auto", run_dir, verbose=False)
    try:
        ckpt.load_checkpoint(engine, *target, rank=rank)
    except Exception as exc:  # what each rank would stop with
        return type(exc).__name__, str(exc)
    return "loaded", ""


def _damage_keeping_size(path: str) -> None:
    """Zeros over the file's bytes: the marker's size check passes, torch.load fails."""
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.write(b"\0" * size)


@pytest.mark.slow
def test_a_failed_universal_conversion_stops_every_rank_with_the_same_line(tmp_path):
    """A checkpoint of 1 rank resumed on 2 ranks, its optimizer file damaged (same size): rank 0's
    conversion failed while rank 1 waited in a barrier, to be freed only by rank 0's exit (a peer
    error) or, on NCCL, the 30-minute group timeout. Criterion: both ranks raise CheckpointError
    with the same one-line message, which says a file does not read and names the way out (an
    older checkpoint; it said to free space, which a damaged file does not need)."""
    run_dir = str(tmp_path / "run")
    run_distributed(_save_one_rank, 1, run_dir)
    (optim,) = glob.glob(os.path.join(run_dir, "checkpoints", "step_00000001", "*optim_states.pt"))
    _damage_keeping_size(optim)
    outcomes = run_distributed(_load_and_report, 2, run_dir, timeout_s=60)
    assert outcomes[0] == outcomes[1], outcomes
    kind, message = outcomes[0]
    assert kind == "CheckpointError" and "\n" not in message, outcomes
    assert "a file of it does not read (" in message and "older checkpoint" in message, message
    assert "free space" not in message, message
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000001", "universal.tmp"))


def test_an_adopted_tokenizer_leaves_out_a_killed_copys_files(tmp_path):
    """A copy into <target>.tmp killed midway left files there; the next start merged them into
    the adopted tokenizer (dirs_exist_ok). Criterion: the adopted folder holds exactly the source's
    files, and the stale file is gone."""
    run = tmp_path / "first"
    texts = ["cats playing piano", "dogs on a skateboard", "best cute cat videos"] * 10
    train_bpe_tokenizer(texts, str(run / "tokenizer"), vocab_size=300)
    os.makedirs(run / "checkpoints" / "step_00000002")
    target = str(tmp_path / "second" / "tokenizer")
    os.makedirs(target + ".tmp")
    with open(os.path.join(target + ".tmp", "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        fh.write('{"pad_token": "<stale>"}')
    ckpt.copy_adopted_tokenizer(str(run / "checkpoints"), str(run / "tokenizer"), target, None)
    assert sorted(os.listdir(target)) == sorted(os.listdir(run / "tokenizer"))
    assert not os.path.exists(target + ".tmp")
