"""The eval pass and the benchmarks under the data-wait watch (vutrain/data_wait.py).

An eval whose val shard read never returns (a hung network mount, a stuck val loader worker) left
the run silent forever mid-eval: only the training batches were watched. Here the val shards are
named pipes (FIFOs) made after the eval listed them and before it reads its first batch, which
nobody writes until the test "brings the mount back" (test_review_trainer12's `_BlockedShards`).
And the benchmarks, whose Trainers never call train(), left the watcher thread running, holding the
Trainer (its engine and memory) until the process exited.
"""

from __future__ import annotations

import argparse
import gc
import glob
import logging
import os
import re
import threading
import time
import weakref

import pytest
from test_review_trainer12 import THRESHOLD_S, _BlockedShards, _check_lines, _DataLines, _release_after

from inprocess_trainer import DIST_ENV, overrides


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vutrain-data-wait")]


@pytest.fixture
def data_lines():
    handler, logger = _DataLines(), logging.getLogger("vutrain")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def three_val_shards(tmp_path_factory):
    """4 training shards and 48 held-out samples in 3 val shards (2 loader workers can split them)."""
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("val3")
    return write_synthetic(str(out), num_samples=64, shard_size=16, val_samples=48, seed=0)


def _trainer(shards: dict, run_dir: str, **extra):
    """A real Trainer of the tiny preset in this process (world 1), never trained: its evaluator."""
    from vutrain.config import load_config
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.trainer import Trainer

    settings = dict(train__checkpoint_every=0, data__stall_warning_s=THRESHOLD_S, **extra)
    cfg = load_config("tiny", overrides(shards, run_dir, steps=2, **settings))
    info = resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV})
    init_distributed(info)
    return Trainer(cfg, info)


def _restore(blocked: _BlockedShards) -> None:
    """End the FIFOs' writers and put the shard files back (idempotent)."""
    if blocked.released_at is not None and not blocked.stop.is_set():
        blocked.unblock()
    for path, data in blocked.contents.items():
        if not os.path.isfile(path):
            os.unlink(path)
            with open(path, "wb") as fh:
                fh.write(data)


@pytest.mark.parametrize(
    "workers, loader",
    [
        (0, "no loader workers (read in this process), 3 val shards over 1 ranks: 3.0 per worker"),
        (2, "2 loader workers, 3 val shards over 1 ranks: 1.5 per worker"),
    ],
)
def test_an_eval_blocked_on_its_val_shards_warns_then_scores_the_same(
    three_val_shards, tmp_path, single_process, data_lines, workers, loader
):
    """A real Trainer's eval whose val shards block until its third warning (read in this process, or
    in 2 real loader workers) logs the eval's three warnings and one arrival line, then gives the metrics of
    the same eval unblocked; no watcher thread is left after either eval, nor after an interrupted
    one."""
    from vutrain.evaluate import EvalInterrupted

    trainer = _trainer(three_val_shards, str(tmp_path / "run"), data__num_workers=workers)
    evaluator = trainer.evaluator
    files = sorted(glob.glob(os.path.join(os.path.dirname(three_val_shards["val_shards"]), "*.tar")))
    assert len(files) == 3
    blocks = []
    try:
        plain = evaluator(trainer.engine)  # also reads (and keeps) the zero-shot classes
        assert data_lines.stalls == [] and data_lines.arrivals == []
        assert _watch_threads() == []
        assert plain["eval/num_samples"] == 48

        read_classes = evaluator.classes

        def block_then_classes(shards_view=None):
            # Called by the eval after it listed the shards (agree_on_val_shards, ValStream) and
            # before its first batch: the shards' storage hangs from here on (a FIFO is no file
            # to the listing).
            blocked = _BlockedShards(files)
            blocks.append((blocked, time.monotonic(), _release_after(blocked, data_lines)))
            return read_classes(shards_view)  # the shards' view is unchanged: kept, no read

        evaluator.classes = block_then_classes
        try:
            again = evaluator(trainer.engine)
        finally:
            evaluator.classes = read_classes
            for blocked, _, timer in blocks:
                timer.join()
                _restore(blocked)
        assert _watch_threads() == []
        blocked, started, _ = blocks[0]
        _check_lines(
            data_lines,
            blocked,
            started,
            f"the eval of data.val_shards={three_val_shards['val_shards']}",
            loader,
        )
        assert again == plain

        with pytest.raises(EvalInterrupted):  # a pre-emption between two eval batches
            evaluator(trainer.engine, stop_requested=lambda: True)
        assert _watch_threads() == []
    finally:
        for blocked, _, timer in blocks:
            timer.join()
            _restore(blocked)
        trainer.stream.close()
        trainer.release_run_dir()


def test_a_wait_that_ends_without_a_batch_says_so(caplog):
    """The eval's last pull ends its batches: after a warning, the line says the wait ended without
    a batch, not that one arrived; the items and their order are unchanged."""
    from vutrain.data_wait import DataWaitWatch

    def slow_end():
        yield 1
        yield 2
        time.sleep(0.8)

    watch = DataWaitWatch(0.3, 0, lambda: "no loader workers")
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        assert list(watch.watched(slow_end(), what="the eval of data.val_shards=v.tar")) == [1, 2]
    watch.close()
    assert _watch_threads() == []
    texts = [r.getMessage() for r in caplog.records]
    warning = "for its next batch (the eval of data.val_shards=v.tar; no loader workers)"
    assert any(warning in t for t in texts), texts
    assert re.match(
        r"rank 0: the wait for the batch for the eval of data\.val_shards=v\.tar ended after \d+ s "
        r"without one$",
        texts[-1],
    ), texts
    assert not any("arrived after" in t for t in texts), texts


def test_the_benchmarks_end_their_watcher_and_free_their_trainer(tiny_shards, tmp_path, single_process):
    """bench.run_one and bench_compare's TrainerStep train through train_step(), never train(): the
    watcher thread lived until the process exited, and with it the Trainer (engine, model, optimizer
    states) of every configuration bench_compare had closed."""
    from vutrain import bench
    from vutrain.bench_compare import TrainerStep, Variant, read_pool
    from vutrain.distributed import init_distributed, resolve_dist_env

    spec = dict(
        run_dir=str(tmp_path / "bench"),
        train_shards=tiny_shards["train_shards"],
        preset="tiny",
        precision="fp32",
        zero_stage=0,
        batch_size=4,
        grad_ckpt="false",
        warmup=0,
        steps=1,
        workers=0,
        loss_backend="torch",
    )
    assert bench.run_one(spec)["step_time_s"] > 0
    assert _watch_threads() == []

    info = resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV})
    init_distributed(info)
    args = argparse.Namespace(
        preset="tiny",
        hidden_act="",
        precision="fp32",
        pool_batch=4,
        compile_backend="inductor",
        compile_scope="layers",
        compile_mode="default",
    )
    variant = Variant("vutrain", False, 0, "torch")
    runner = TrainerStep(variant, args, info, str(tmp_path / "compare"), tiny_shards["train_shards"])
    runner.step(read_pool(runner.stream, 4))
    assert len(_watch_threads()) == 1  # the step was watched
    trainer = weakref.ref(runner.trainer)
    runner.close()
    del runner
    gc.collect()
    assert _watch_threads() == []
    assert trainer() is None, "the closed configuration's Trainer is still held"
