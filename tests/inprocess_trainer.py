"""Train with the real Trainer inside the test process (world 1): no launcher, no subprocess.

Use with conftest's `single_process` fixture, which removes the launcher variables, keeps one
intra-op thread and closes the process group afterwards.
"""

from __future__ import annotations

import os

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def overrides(shards: dict, run_dir: str, steps: int, **extra) -> list[str]:
    """A tiny run: batch 16, a 512-token vocabulary, no progress bar, eval and checkpoint every 2 steps,
    no loader worker.

    `extra` adds or replaces keys, with `__` for the dot: `train__zero_stage=3`.

    No loader worker by default: a worker is forked from the long-lived pytest process, whose
    earlier tests leave threads and library state behind; such forked workers died with a
    segmentation fault in two CI runs (tests of the export, not of the loader). The loader's own
    tests, and the runs in subprocesses, keep their workers; a test here that is about workers
    sets `data__num_workers`.
    """
    values = {
        "output_dir": run_dir,
        "data.train_shards": shards["train_shards"],
        "data.val_shards": shards["val_shards"],
        "data.shuffle_buffer": 64,
        "data.num_workers": 0,
        "train.max_steps": steps,
        "train.micro_batch_size": 16,
        "train.warmup_steps": 2,
        "train.checkpoint_every": 2,
        "train.progress_bar": "false",
        "eval.every": 2,
        "eval.batch_size": 24,
        "model.vocab_size": 512,
        "train.resume": "auto",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def train(shards: dict, run_dir: str, steps: int, on_trainer=None, **extra) -> dict:
    """Build a Trainer from the shipped `tiny` run file in this process, train, close the group.

    `on_trainer(trainer)`, if given, runs after the Trainer is built and before it trains (hooks).
    Returns the last eval metrics ({} without val shards).
    """
    from vutrain.config import load_config
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env
    from vutrain.trainer import Trainer

    cfg = load_config("tiny", overrides(shards, run_dir, steps, **extra))
    # As a fresh `python` process sees it: init_distributed() of an earlier run exported RANK etc.
    info = resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV})
    assert info.world_size == 1 and info.launcher == "single", info
    init_distributed(info)
    try:
        trainer = Trainer(cfg, info)
        if on_trainer is not None:
            on_trainer(trainer)
        return trainer.train()
    finally:
        cleanup()


def train_preset_run(shards: dict, run_dir: str) -> str:
    """A preset run of 2 steps with a complete checkpoint at step 2 and its tokenizer in
    RUN/tokenizer, for module-scoped fixtures whose tests copy and damage it."""
    train_outside_test(shards, run_dir, steps=2, train__checkpoint_every=2, eval__every=0)
    return run_dir


def train_outside_test(shards: dict, run_dir: str, steps: int, one_thread: bool = False, **extra) -> dict:
    """`train` for a module-scoped fixture, called outside a test's `single_process`: the launcher
    variables the run exports are put back afterwards (and torch's thread count, with
    ``one_thread``, which keeps a fixture's run from competing with the other test workers)."""
    import torch

    from vutrain.distributed import cleanup

    saved = {key: os.environ.pop(key) for key in DIST_ENV if key in os.environ}
    threads = torch.get_num_threads()
    if one_thread:
        torch.set_num_threads(1)
    try:
        return train(shards, run_dir, steps, **extra)
    finally:
        cleanup()
        torch.set_num_threads(threads)
        for key in DIST_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved)
