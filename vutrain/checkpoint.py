"""DeepSpeed checkpoints plus the trainer's own per-rank state (step, RNG, data stream position).

Layout: RUN/checkpoints/step_00000100/ holds DeepSpeed's files (every rank writes its ZeRO shards)
and trainer_state_rank{R}.pt. DeepSpeed writes RUN/checkpoints/latest only after a save completes,
so a run killed mid-save resumes from the previous complete checkpoint. The trainer's files are
written before DeepSpeed's for the same reason.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from vutrain import checkpoint_reshape as reshape

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag DeepSpeed's `latest` file names, if it and its directory exist."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def list_tags(ckpt_dir: str) -> list[str]:
    """Checkpoint tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def resolve_resume(resume: str, run_dir: str) -> tuple[str, str] | None:
    """(checkpoints dir, tag) to load, or None to start fresh.

    resume: "auto" (newest in this run, if any), "never", a tag directory
    (RUN/checkpoints/step_00000100) or a checkpoints directory (its `latest`).
    """
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_dir = checkpoints_dir(run_dir)
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = os.path.abspath(resume)
    tag = latest_tag(path)
    if tag:
        return path, tag
    if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    raise FileNotFoundError(f"train.resume={resume}: no DeepSpeed checkpoint there (expected a "
                            "checkpoints/ directory with a 'latest' file, or a step_XXXXXXXX directory)")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, run_dir: str, step: int, trainer_state: dict, rank: int, keep: int) -> str:
    """Save on every rank (ZeRO shards live on each); rank 0 prunes to the newest `keep` afterwards."""
    ckpt_dir = checkpoints_dir(run_dir)
    tag = tag_for(step)
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    state = dict(trainer_state, rng=rng_state())
    torch.save(state, os.path.join(ckpt_dir, tag, f"trainer_state_rank{rank}.pt"))
    reshape.save_world_info(engine, os.path.join(ckpt_dir, tag), trainer_state)  # all ranks' data states
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        for old in list_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return tag


def load_checkpoint(engine, ckpt_dir: str, tag: str, rank: int) -> dict:
    """Restore engine (weights, optimizer, LR schedule) and return this rank's trainer state."""
    if reshape.world_changed(os.path.join(ckpt_dir, tag)):  # written by another number of ranks
        return reshape.load_reshaped(engine, ckpt_dir, tag)
    path = os.path.join(ckpt_dir, tag, f"trainer_state_rank{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: resume with the world size the checkpoint was written "
                                "with, or start fresh with train.resume=never")
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}/{tag}")
    state = torch.load(path, weights_only=False)
    set_rng_state(state.pop("rng"))
    log.info("resumed from %s/%s at step %d", ckpt_dir, tag, state["step"])
    return state
