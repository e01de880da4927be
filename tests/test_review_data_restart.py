"""A resume over a changed shard list (a new scrape added shards): data.restart_stream keeps the
weights, Adam moments, LR schedule and step and starts the data stream at the next epoch of the
new list; without it the resume is refused in one line that names the key.

A world-1 Trainer in this process (tests/inprocess_trainer.py), real DeepSpeed checkpoints, real
JPEG shards, and the stream's own sample log (VUTRAIN_SAMPLE_LOG) for which samples were read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream, make_preprocess
from vutrain.data.epoch_remainder import SAMPLE_LOG_ENV, StreamStateError
from vutrain.data.synthetic import write_synthetic

from inprocess_trainer import train

BATCH = 16


@pytest.fixture(scope="module")
def grown(tiny_shards, tmp_path_factory) -> dict:
    """The tiny run's 4 training shards (256 samples) and a new scrape's fifth, in a new folder
    with its sizes.json: {"spec": brace range over the 5, "num_samples": 320}."""
    new = write_synthetic(str(tmp_path_factory.mktemp("scrape")), num_samples=320, shard_size=64, seed=1)
    old_dir = os.path.dirname(tiny_shards["train_shards"])
    out = tmp_path_factory.mktemp("grown")
    for name in [f"{i:05d}.tar" for i in range(4)]:
        shutil.copy(os.path.join(old_dir, name), out / name)
    shutil.copy(os.path.join(os.path.dirname(new["train_shards"]), "00004.tar"), out / "00004.tar")
    sizes = {f"{i:05d}.tar": 64 for i in range(5)}
    (out / "sizes.json").write_text(json.dumps(sizes), encoding="utf-8")
    return {"spec": str(out / "{00000..00004}.tar"), "num_samples": 320}


def _run(shards: dict, run_dir: str, steps: int, on_trainer=None, **extra) -> None:
    # No eval (nothing here is about it): a checkpoint every 2 steps.
    train(shards, run_dir, steps, on_trainer, data__val_shards="", eval__every=0, **extra)


def _full_state(engine) -> dict:
    """Every parameter's fp32 value and Adam moments, Adam's step and the global step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):  # see tests/test_resume_world_size.py
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {
        name: [safe_get_full_fp32_param(p).clone()]
        + [safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq")]
        for name, p in engine.module.named_parameters()
    }
    out["_adam_steps"] = sorted({float(s["step"]) for s in optimizer.optimizer.state.values()})
    out["_global_steps"] = engine.global_steps
    return out


def _assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, values in want.items():
        if isinstance(values, list) and values and isinstance(values[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(got[name], values)), name
        else:
            assert got[name] == values, name


def _reference_keys(trainer, spec: str, batches: range, log_path: str) -> list[str]:
    """Sample keys of `batches` of a fresh stream over `spec` with the trainer's data settings."""
    d = trainer.cfg.data
    os.environ[SAMPLE_LOG_ENV] = log_path
    stream = TrainStream(
        spec,
        preprocess=trainer.train_preprocess,
        tokenize=trainer.tokenize,
        batch_size=BATCH,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=trainer.cfg.seed,
        caption_template=d.caption_template,
        shuffle_buffer=d.shuffle_buffer,
    )
    with stream:
        for _ in range(batches.stop):
            next(stream)
    os.environ.pop(SAMPLE_LOG_ENV)
    keys = _read_log(log_path)
    return keys[batches.start * BATCH :]


def _read_log(log_path: str) -> list[str]:
    with open(f"{log_path}.{os.getpid()}", encoding="utf-8") as fh:
        return fh.read().split()


def test_a_grown_shard_list_keeps_model_and_step_and_restarts_the_stream_with_the_key(
    tiny_shards, grown, tmp_path, single_process, caplog
):
    """2 steps over 4 shards, a fifth added, resumed with data.restart_stream=true: the weights,
    Adam moments and steps are the checkpoint's, the run trains steps 3 and 4, its samples are
    batches 20-21 of a fresh stream over the 5 shards (the first of epoch 1 at 20 batches per
    epoch: not epoch 0's order again), and one warning says the data position was not restored
    and why. Before, a changed list could only start afresh (train.resume=never), model and all.
    The same command requeued after the restart's checkpoint (step 4, saved over the new list)
    restores that exact position (batch 22), not a jump to another epoch at every pre-emption."""
    run = str(tmp_path / "run")
    first = {}
    _run(tiny_shards, run, 2, on_trainer=lambda t: first.setdefault("trainer", t))
    saved = _full_state(first.pop("trainer").engine)
    new_list = dict(tiny_shards, train_shards=grown["spec"])
    seen, log_path = {}, str(tmp_path / "samples")

    def on_resumed(trainer):
        seen["step"], seen["batches"] = trainer.step, trainer.stream.batches_seen
        _assert_same_state(_full_state(trainer.engine), saved)
        seen["epoch1"] = _reference_keys(trainer, grown["spec"], range(20, 22), str(tmp_path / "ref1"))
        seen["epoch0"] = _reference_keys(trainer, grown["spec"], range(0, 2), str(tmp_path / "ref0"))
        os.environ[SAMPLE_LOG_ENV] = log_path

    with caplog.at_level(logging.WARNING, logger="vutrain"):
        try:
            _run(new_list, run, 4, on_trainer=on_resumed, data__restart_stream="true")
        finally:
            os.environ.pop(SAMPLE_LOG_ENV, None)
    assert (seen["step"], seen["batches"]) == (2, 20)
    read = _read_log(log_path)
    assert read == seen["epoch1"] and read != seen["epoch0"]
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    warned = [r.getMessage() for r in caplog.records if "data.restart_stream" in r.getMessage()]
    assert len(warned) == 1 and "position of step 2 was not restored" in warned[0], warned
    assert "names other shards" in warned[0] and "epoch 1" in warned[0]

    caplog.clear()
    requeued = {}
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        _run(
            new_list,
            run,
            4,
            on_trainer=lambda t: requeued.update(step=t.step, batches=t.stream.batches_seen),
            data__restart_stream="true",
        )
    assert requeued == {"step": 4, "batches": 22}
    assert not [r for r in caplog.records if "not restored" in r.getMessage()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """6 shards of 16 tiny images ("old"), the same 6 plus a new one with its sizes.json ("new"),
    and `make(spec, world_size, rank, **settings)` for a TrainStream over them."""
    root = tmp_path_factory.mktemp("restart_small")
    old = write_synthetic(str(root / "old"), 96, 16, image_size=16, seed=3, val_samples=0)
    extra = write_synthetic(str(root / "extra"), 112, 16, image_size=16, seed=4, val_samples=0)
    new = root / "new"
    shutil.copytree(os.path.dirname(old["train_shards"]), new)
    shutil.copy(os.path.join(os.path.dirname(extra["train_shards"]), "00006.tar"), new / "00006.tar")
    (new / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 16 for i in range(7)}), encoding="utf-8")
    (new / "__len__").unlink(missing_ok=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})

    def tokenize(captions: list[str]) -> dict:
        ids = torch.tensor([[len(c)] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def make(spec: str, world_size: int = 1, rank: int = 0, **settings) -> TrainStream:
        return TrainStream(
            spec,
            preprocess=make_preprocess(processor),
            tokenize=tokenize,
            batch_size=4,
            rank=rank,
            world_size=world_size,
            num_workers=0,
            seed=0,
            **{"shuffle_buffer": 8, **settings},
        )

    return {"make": make, "old": old["train_shards"], "new": str(new / "{00000..00006}.tar")}


def _positions(make, spec: str, world_size: int, batches: int) -> list[dict]:
    """Every rank's state after `batches` batches over `spec`."""
    states = []
    for rank in range(world_size):
        with make(spec, world_size, rank) as stream:
            for _ in range(batches):
                next(stream)
            states.append(stream.state_dict())
    return states


def test_a_refused_position_names_the_key_and_restart_after_reads_the_next_epoch(small):
    """A rank's own state and every rank's ({"ranks": ...}, another world size), over a list with a
    shard added: load_state_dict refuses in one line naming data.restart_stream=true (and
    train.resume=never); restart_after then serves the first batch of epoch 1 of the new list,
    the batch a fresh stream over it yields there. A world-size reshape refused for another data
    setting (the same list) names the key too: before, its line offered only train.resume=never."""
    make = small["make"]
    with make(small["new"]) as fresh:
        steps = fresh.steps_per_epoch  # 112 // 4
        want = [next(fresh) for _ in range(steps + 1)][steps]
    for saved in (_positions(make, small["old"], 1, 3)[0], {"ranks": _positions(make, small["old"], 2, 3)}):
        with make(small["new"]) as stream:
            with pytest.raises(StreamStateError) as refused:
                stream.load_state_dict(saved)
            message = str(refused.value)
            assert "\n" not in message and "data.restart_stream=true" in message
            assert "train.resume=never" in message
            assert stream.restart_after(saved) == 1
            assert stream.batches_seen == steps
            got = next(stream)
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["input_ids"], want["input_ids"])

    with make(small["old"], shuffle_buffer=4) as other, pytest.raises(StreamStateError) as refused:
        other.load_state_dict({"ranks": _positions(make, small["old"], 2, 3)})
    message = str(refused.value)
    assert "\n" not in message and "shuffle_buffer" in message and "data.restart_stream=true" in message
