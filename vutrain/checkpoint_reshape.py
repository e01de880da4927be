"""Resume a checkpoint on a different number of ranks (world size), with the data position kept.

Save: next to DeepSpeed's files, rank 0 writes ``world.json`` in the tag directory: the world
size, micro batch, gradient accumulation, ZeRO stage, step, and the data-stream state of every
rank (gathered with one collective), so the checkpoint describes the whole data position.

Load on another world size (``load_checkpoint`` calls ``load_reshaped``):

- The global batch must stay (``micro_batch_size x grad_accum_steps x world``); otherwise a
  one-line error names the key to change.
- Model, optimizer moments, LR schedule and step come from DeepSpeed's universal checkpoint:
  rank 0 converts the tag once with ``deepspeed.checkpoint.ds_to_universal`` into
  ``<tag>/universal`` (per-parameter fp32 weights, exp_avg, exp_avg_sq; kept for later
  resumes, which reuse it only while every file its ``vutrain_manifest.json`` lists has its
  size, else convert again), then every rank loads it with the engine's universal loader, which cuts each
  parameter's full state into this world's ZeRO partitions. This works for ZeRO-1, 2 and 3 and
  with frozen (LoRA) parameters on CPU/gloo as well as GPUs (see tests/test_resume_world_size.py).
  A ZeRO-0 tag has no optimizer shards (the whole state is in the model-states file, which any
  world size reads as it is): it is loaded directly.
- The data stream gets every old rank's state and continues the epoch (data/epoch_remainder.py).
- The same world size under another train.precision (bf16 vs fp32: DeepSpeed names the optimizer
  files by precision) loads through the universal copy too, with each rank's own data state.
- Another ZeRO stage: 1 and 2 read each other's tags; 0 and 3 only their own (``check_zero_stage``).
- The Python/NumPy/torch RNG states are per rank and are not carried over (the model and the
  data stream do not draw from them during training).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from vutrain.config import ConfigError
from vutrain.distributed import collective_backend

log = logging.getLogger(__name__)
WORLD_FILE = "world.json"
UNIVERSAL_DIR = "universal"
MANIFEST = "vutrain_manifest.json"  # in UNIVERSAL_DIR: every file of the copy and its size
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class ResumeShapeError(ConfigError):
    """The checkpoint cannot be resumed on this world size as configured (the message says why)."""


class UniversalConversionError(RuntimeError):
    """The universal copy of a tag could not be written (one line that says what to do)."""


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_world_info(engine, tag_dir: str, trainer_state: dict) -> None:
    """Write ``tag_dir/world.json`` (rank 0) with every rank's data state. Call on all ranks."""
    rank, world = _world()
    data_states: list = [trainer_state.get("data")]
    if world > 1:
        data_states = [None] * world
        dist.all_gather_object(data_states, trainer_state.get("data"))
    if rank != 0:
        return
    info = {
        "world_size": world,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "grad_accum_steps": engine.gradient_accumulation_steps(),
        "zero_stage": engine.zero_optimization_stage(),
        "step": int(trainer_state["step"]),
        "nonfinite_in_row": int(trainer_state.get("nonfinite_in_row", 0)),
        # The zeroed-gradient step count and how much of it was logged (the same on every rank):
        # left out, a reshaped resume restarted train/zeroed_nonfinite_grad_steps at 0.
        "zeroed_grad_steps": trainer_state.get("zeroed_grad_steps"),
        # The logging interval's sums and a pending eval (trainer.state_dict): the same on every rank.
        "interval": trainer_state.get("interval"),
        "eval_pending": bool(trainer_state.get("eval_pending", False)),
        "finished": bool(trainer_state.get("finished", False)),
        # Rank 0's step time of the logging interval so far (train/step_time after a resume).
        "interval_wall": float(trainer_state.get("interval_wall", 0.0)),
        "interval_steps": int(trainer_state.get("interval_steps", 0)),
        # The interval's loss-term sums and largest gradient norm (rank 0's, as it logs them): left
        # out, a reshaped resume mid-interval logged train/grad_norm_max and train/align|uniform
        # over the steps after it only, while train/loss covered the whole interval.
        "interval_terms": trainer_state.get("interval_terms"),
        "interval_grad_norm_max": trainer_state.get("interval_grad_norm_max"),
        "data": data_states,
        "parameters": model_parameters(engine.module),
    }
    tmp = os.path.join(tag_dir, WORLD_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    os.replace(tmp, os.path.join(tag_dir, WORLD_FILE))


def saved_world_size(tag_dir: str) -> int | None:
    """World size the checkpoint was written with: world.json, else DeepSpeed's optimizer shards."""
    path = os.path.join(tag_dir, WORLD_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return int(json.load(fh)["world_size"])
    ranks = {int(m.group(2)) for f in os.listdir(tag_dir) if (m := _OPTIM_FILE.match(f))}
    return max(ranks) + 1 if ranks else None


def world_changed(tag_dir: str) -> bool:
    """True when the checkpoint in ``tag_dir`` was written by another number of ranks."""
    saved = saved_world_size(tag_dir)
    return saved is not None and saved != _world()[1]


def _world_info(tag_dir: str) -> dict:
    """The tag's world.json, or {} for a tag written before it existed."""
    path = os.path.join(tag_dir, WORLD_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def model_parameters(module: torch.nn.Module) -> dict[str, list]:
    """{name: [full shape, trainable]} of every parameter: ZeRO-3's full shape, not its partition."""
    return {
        name: [list(getattr(param, "ds_shape", param.shape)), bool(param.requires_grad)]
        for name, param in module.named_parameters()
    }


def check_model(tag_dir: str, module: torch.nn.Module) -> None:
    """ResumeShapeError (one line) if the tag holds other parameters than ``module`` has.

    A changed model setting (model.lora.enabled, model.image_size, a preset, a locked tower, the
    logit bias of loss.name=siglip) failed inside DeepSpeed's load with "Error(s) in loading
    state_dict for ClipTrainModule:", "KeyError: 'clip.vision_model...'" or "The size of tensor a
    (1297408) must match ..." and the advice to try an older checkpoint, which fails the same way.
    Checked before any load, so a world-size change does not convert the tag first (an assertion
    inside DeepSpeed's universal loader after that). Tags whose world.json lists no parameters
    (written before it did) pass.
    """
    saved = _world_info(tag_dir).get("parameters")
    if saved is None:
        return
    differences = _model_differences(saved, model_parameters(module))
    if differences:
        raise ResumeShapeError(
            f"{tag_dir} holds another model than this run builds ({'; '.join(differences)}): resume "
            "with the settings that wrote it (in that run's config.yaml: model.preset, model.name_or_path, "
            "model.image_size, model.context_length, model.vocab_size, model.lora.*, model.lock_image, "
            "model.lock_text, loss.name), or start afresh with train.resume=never or another output_dir"
        )


def _model_differences(saved: dict[str, list], ours: dict[str, list]) -> list[str]:
    """Phrases for what differs between two `model_parameters`, each with one example."""

    def phrase(names: list[str], what: str, example=lambda name: name) -> list[str]:
        return [f"{len(names)} {what}, e.g. {example(names[0])}"] if names else []

    only_saved = [n for n in saved if n not in ours]
    only_ours = [n for n in ours if n not in saved]
    both = [n for n in saved if n in ours]
    reshaped = [n for n in both if saved[n][0] != ours[n][0]]
    refrozen = [n for n in both if saved[n][0] == ours[n][0] and saved[n][1] != ours[n][1]]
    return (
        phrase(only_saved, "parameters of the checkpoint are not in this model")
        + phrase(only_ours, "parameters of this model are not in the checkpoint")
        + phrase(reshaped, "of another shape", lambda n: f"{n} {saved[n][0]} there, {ours[n][0]} here")
        + phrase(
            refrozen,
            "trained there and frozen here or the reverse",
            lambda n: f"{n} {'trained' if saved[n][1] else 'frozen'} there",
        )
    )


def check_zero_stage(tag_dir: str, stage: int) -> None:
    """ResumeShapeError (one line, naming the key) if DeepSpeed cannot load the tag into ``stage``.

    ZeRO-1 and 2 share one file layout (any world size, tested); ZeRO-0 keeps the optimizer in the
    model file and ZeRO-3 partitions the weights, and neither loads into another stage, even through
    the universal checkpoint. Before, that failed inside DeepSpeed ("AssertionError: ") with the
    advice to try an older checkpoint, which fails the same way.
    """
    saved = _world_info(tag_dir).get("zero_stage")
    if saved is None or saved == stage or {saved, stage} <= {1, 2}:
        return
    same = "train.zero_stage=1 or 2" if saved in (1, 2) else f"train.zero_stage={saved}"
    raise ResumeShapeError(
        f"{tag_dir} was written with ZeRO stage {saved} and this run has train.zero_stage={stage}: "
        f"DeepSpeed cannot load it into that stage; resume with {same} "
        "(stages 1 and 2 read each other's checkpoints, 0 and 3 only their own)"
    )


def check_global_batch(info: dict, micro: int, accum: int, world: int) -> None:
    """ResumeShapeError (one line, naming the key to change) if the global batch would change."""
    saved = info["micro_batch_size"] * info["grad_accum_steps"] * info["world_size"]
    now = micro * accum * world
    if saved == now:
        return
    fixes = []
    if saved % (micro * world) == 0:
        fixes.append(f"train.grad_accum_steps={saved // (micro * world)}")
    if saved % (accum * world) == 0:
        fixes.append(f"train.micro_batch_size={saved // (accum * world)}")
    hint = f"set {' or '.join(fixes)}" if fixes else f"use a world size that divides {saved}"
    if saved % (micro * world) == 0:
        # train.global_batch_size derives train.grad_accum_steps and refuses one typed beside it,
        # so where it is set only its saved value keeps the batch.
        hint += f" (with train.global_batch_size set: train.global_batch_size={saved})"
    hint += "; or keep the new batch in a new run (another output_dir, or train.resume=never)"
    if info["world_size"] == world:
        change = f"train.micro_batch_size {info['micro_batch_size']} -> {micro}"
    else:
        change = f"world {info['world_size']} -> {world}"
    raise ResumeShapeError(
        f"{change} changes the global batch {saved} -> {now} "
        f"(train.micro_batch_size {micro} x train.grad_accum_steps {accum} x world {world}): {hint}"
    )


def data_state_on_same_world(engine, tag_dir: str, own: dict) -> dict:
    """The data state to restore on the world size that saved the tag: this rank's own (``own``),
    or, when ``train.micro_batch_size`` changed (the global batch kept through
    ``train.grad_accum_steps``), every rank's, which the stream turns into the rest of the epoch
    at the new micro batch as it does for a new world size (data/epoch_remainder.py).

    Until 2026-12-06 such a resume stopped with "resume with the saved values, or start the data
    stream fresh", for which there was no setting.
    """
    info = _world_info(tag_dir)
    micro = engine.train_micro_batch_size_per_gpu()
    if not info.get("data") or info.get("micro_batch_size", micro) == micro:
        warn_accumulation_changed(info, engine.gradient_accumulation_steps())
        return own
    check_global_batch(info, micro, engine.gradient_accumulation_steps(), _world()[1])
    return {"ranks": info["data"]}


def warn_accumulation_changed(info: dict, accum: int) -> None:
    """Warn once (rank 0) that a resume on the same world and micro batch trains another global batch.

    The data position stays exact (each rank's stream is per micro batch), so the change is allowed
    (a batch-size ramp), but it went without a word while every other change of the global batch
    on resume is refused.
    """
    saved = info.get("grad_accum_steps")
    if saved is None or saved == accum or _world()[0] != 0:
        return
    micro, world = info["micro_batch_size"], info["world_size"]
    log.warning(
        "train.grad_accum_steps %d -> %d changes the global batch %d -> %d from this resume on "
        "(train.micro_batch_size %d x world %d); the LR schedule and step count go on as they were: "
        "set train.grad_accum_steps=%d (or train.global_batch_size=%d) to keep the batch",
        saved,
        accum,
        micro * saved * world,
        micro * accum * world,
        micro,
        world,
        saved,
        micro * saved * world,
    )


def convert_to_universal(tag_dir: str, again: bool = False) -> str:
    """``tag_dir/universal`` (DeepSpeed's universal checkpoint of the tag), made once, atomically.

    ``again`` converts anew even where a copy exists; that copy stays until the new one is in place.
    """
    finish_interrupted_replace(tag_dir)  # the CLI too, not only a resume
    out = os.path.join(tag_dir, UNIVERSAL_DIR)
    if os.path.isdir(out) and not again:
        problem = _universal_problem(out)
        if problem is None:
            return out
        log.warning("converting %s again: its %s/ is not whole (%s)", tag_dir, UNIVERSAL_DIR, problem)
        shutil.rmtree(out, ignore_errors=True)  # useless as it is; the new copy may need its space

    tmp = out + ".tmp"
    start = time.perf_counter()
    try:
        _write_universal(tag_dir, tmp)
        _write_manifest(tmp)
    except Exception as exc:
        # A full disk or read-only folder failed inside its C++ writer ("RuntimeError:
        # basic_ios::clear: iostream error") with the advice to try an older checkpoint,
        # which fails the same way.
        shutil.rmtree(tmp, ignore_errors=True)
        raise UniversalConversionError(_conversion_failure_message(tag_dir, out, exc)) from exc
    _replace_dir(tmp, out)
    log.info("converted %s to a universal checkpoint in %.1f s", tag_dir, time.perf_counter() - start)
    return out


def _write_manifest(universal: str) -> None:
    """List every file of the copy with its size in ``universal/MANIFEST``, written last."""
    files = {
        os.path.relpath(os.path.join(d, f), universal): os.path.getsize(os.path.join(d, f))
        for d, _, names in os.walk(universal)
        for f in names
    }
    with open(os.path.join(universal, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(files, fh)


def _universal_problem(universal: str) -> str | None:
    """Why the copy in ``universal`` cannot be reused (one phrase), or None.

    Reused unchecked, a copy cut short (``cp -r`` of one converted ahead, stopped part way; a
    machine crash after the rename) failed inside DeepSpeed's loader at every later resume, with
    the advice to try an older checkpoint. A copy without the manifest (converted by a vutrain
    before it) cannot be told from one cut short, so it is converted again too.
    """
    try:
        with open(os.path.join(universal, MANIFEST), encoding="utf-8") as fh:
            files = json.load(fh)
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    if not isinstance(files, dict):
        return f"{MANIFEST} is not a file list"
    for name, size in files.items():
        path = os.path.join(universal, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {MANIFEST} says {size}"
    return None


def finish_interrupted_replace(tag_dir: str) -> None:
    """Complete a replacement of ``tag_dir/universal`` that a kill cut between its two renames.

    That left ``universal.old`` (a full copy of the fp32 weights and moments) on disk until the next
    conversion of the tag, and no ``universal/`` although the whole new copy sat in ``universal.tmp``.
    Both names are ours (``_replace_dir``); a ``.tmp`` is moved in only when its manifest shows it whole.
    """
    out = os.path.join(tag_dir, UNIVERSAL_DIR)
    new, old = out + ".tmp", out + ".old"
    if not os.path.isdir(out) and os.path.isdir(new) and _universal_problem(new) is None:
        os.replace(new, out)
        log.warning("moved the universal copy of %s into place (a kill had cut its move short)", tag_dir)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
        log.warning("removed %s, left by a re-conversion that was killed", old)


def _replace_dir(new: str, path: str) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` goes only once ``new`` is there."""
    if not os.path.isdir(path):
        os.replace(new, path)
        return
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_universal(tag_dir: str, tmp: str) -> None:
    """ds_to_universal of ``tag_dir`` into a fresh ``tmp``."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)  # a read-only run directory fails here, before any work
    # ds_to_universal builds regular expressions and glob patterns from these paths unescaped, so
    # a run directory such as "runs/vit+tags" or "exp(2)" failed ("Cannot parse dp_rank"). It gets
    # links with plain names instead (its `latest_universal` file lands beside them, not here).
    with tempfile.TemporaryDirectory(prefix="vutrain_universal_") as links:
        src, dst = os.path.join(links, "input"), os.path.join(links, "output")
        os.symlink(os.path.abspath(tag_dir), src, target_is_directory=True)
        os.symlink(os.path.abspath(tmp), dst, target_is_directory=True)
        args = argparse.Namespace(
            input_folder=src,
            output_folder=dst,
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        # Its progress prints and bars (stdout, stderr) would flood the run log; logging keeps
        # the streams it was given.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)


# A write that the file system refuses: full, over a quota or a file-size limit, read-only, not ours.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _failed_writing(exc: Exception) -> bool:
    """Whether the conversion failed writing its copy (else reading the checkpoint): an OSError
    of a refused write, or the C++ writers' own words (DeepSpeed's "basic_ios::clear: iostream
    error", torch.save's "PytorchStreamWriter failed writing file")."""
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_ERRNOS
    text = str(exc)
    return "iostream" in text or "failed writing" in text or "write failed" in text


def _conversion_failure_message(tag_dir: str, out: str, exc: Exception) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    if not _failed_writing(exc):
        # A damaged file (zeros over it, a copy cut short) was told to free space, and its other
        # ways out (convert ahead, resume on the world size that wrote it) fail the same way.
        return (
            f"could not convert {tag_dir} to the universal format: a file of it does not read "
            f"({type(exc).__name__}: {detail}); it is damaged or cut short (a copy, a kill while "
            "saving): point train.resume at an older checkpoint of the run, or start afresh with "
            "train.resume=never"
        )
    size = _dir_bytes(tag_dir)
    size_text = f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    return (
        f"could not write the universal copy of {tag_dir} into {out} "
        f"({type(exc).__name__}: {detail}); it needs about {size_text} there: free space (or "
        "make the folder writable), or convert it ahead where it "
        f"can be written with `python -m vutrain.checkpoint_reshape {tag_dir}` and copy its "
        f"{UNIVERSAL_DIR}/ in, or resume with the world size and train.precision that wrote it"
    )


def load_reshaped(engine, ckpt_dir: str, tag: str) -> dict:
    """Load a checkpoint written on another world size; returns the trainer state to restore.

    The trainer state's ``data`` is ``{"ranks": [...]}`` (every old rank's stream state), which
    ``TrainStream.load_state_dict`` turns into this rank's share of the epoch's remainder.
    """
    tag_dir = os.path.join(ckpt_dir, tag)
    rank, world = _world()
    path = os.path.join(tag_dir, WORLD_FILE)
    if not os.path.isfile(path):
        raise ResumeShapeError(
            f"{tag_dir} was written by {saved_world_size(tag_dir)} ranks without "
            f"{WORLD_FILE} (an older vutrain): resume it with that many ranks"
        )
    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    check_global_batch(
        info, engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), world
    )
    if not _has_optimizer_shards(tag_dir):
        # ZeRO-0: the whole optimizer state sits in mp_rank_00_model_states.pt, which
        # every rank of any world size reads as it is; ds_to_universal needs optimizer shards.
        from vutrain.checkpoint_precision import load_zero0  # imports this module

        if load_zero0(engine, ckpt_dir, tag) is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    else:
        load_universal(engine, tag_dir, rank)
    log.info(
        "resumed %s (written by %d ranks) on %d ranks at step %d",
        tag_dir,
        info["world_size"],
        world,
        info["step"],
    )
    return {
        "step": info["step"],
        "nonfinite_in_row": info["nonfinite_in_row"],
        "zeroed_grad_steps": info.get("zeroed_grad_steps"),
        "interval": info.get("interval"),
        "eval_pending": info.get("eval_pending", False),
        "finished": info.get("finished", False),
        "interval_wall": info.get("interval_wall", 0.0),
        "interval_steps": info.get("interval_steps", 0),
        "interval_terms": info.get("interval_terms"),
        "interval_grad_norm_max": info.get("interval_grad_norm_max"),
        "data": {"ranks": info["data"]},
    }


def precision_changed(engine, tag_dir: str) -> bool:
    """Whether the tag's ZeRO optimizer files were written under the other of bf16 and fp32/fp16.

    DeepSpeed names them by precision (``bf16_zero_pp_rank_*``) and its plain loader reads only
    this engine's names, at every stage; the universal checkpoint holds fp32 weights and moments
    whatever the precision, so such a tag loads through it (``load_universal``).
    """
    saved = {bool(m.group(1)) for f in os.listdir(tag_dir) if (m := _OPTIM_FILE.match(f))}
    return bool(saved) and engine.bfloat16_enabled() not in saved


def _has_optimizer_shards(tag_dir: str) -> bool:
    """Whether the tag holds per-rank optimizer files (ZeRO-1/2/3; ZeRO-0 writes none)."""
    return any(_OPTIM_FILE.match(f) for f in os.listdir(tag_dir))


def load_universal(engine, tag_dir: str, rank: int) -> None:
    """Convert the tag once (rank 0) and load the universal copy into this world's partitions."""
    failure = None
    if rank == 0:
        try:
            convert_to_universal(tag_dir)
        except UniversalConversionError as exc:  # told to every rank below, then raised on each
            failure = exc
    share_conversion_outcome(failure)
    # The engine reads this flag only inside load_checkpoint, so it is set for this one load
    # instead of in the ds_config (which is built before we know whether to reshape).
    engine._config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(
            tag_dir, tag=UNIVERSAL_DIR, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {tag_dir}/{UNIVERSAL_DIR}")
    steps_to_param_devices(getattr(engine.optimizer, "optimizer", engine.optimizer))


def share_conversion_outcome(failure: UniversalConversionError | None) -> None:
    """Every rank waits for rank 0's conversion and raises its error if it failed.

    A plain barrier left the other ranks waiting in it when the conversion failed (a full disk, a
    damaged optimizer file): freed by rank 0's exit as a peer's error, or on NCCL only by the
    process group's timeout (30 minutes), while rank 0 alone said why."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if failure is None else str(failure)]
        # The broadcast is the barrier: a rank passes it once rank 0 is done or has failed.
        dist.broadcast_object_list(box, src=0, device=_object_device())
        if box[0] is not None and failure is None:
            raise UniversalConversionError(box[0])
    if failure is not None:
        raise failure


def _object_device() -> torch.device:
    """The device the default group's object collectives run on: the CPU where a backend serves it
    (gloo, a "cpu:gloo,cuda:nccl" group), else this rank's GPU (plain nccl, cuda:gloo)."""
    if collective_backend("cpu") is not None or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def steps_to_param_devices(optimizer: torch.optim.Optimizer) -> None:
    """Put every `step` tensor on its parameter's device, as fp32.

    DeepSpeed's universal loader assigns the saved step (a CPU tensor) straight into the optimizer
    state, past the `load_state_dict` that would move it. The fused CUDA AdamW reads each step
    through a device pointer without checking where it lives, so a CPU step there is an illegal
    memory access at the first update after the resume.
    """
    for param, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step) and (step.device != param.device or step.dtype != torch.float32):
            state["step"] = step.to(param.device, torch.float32)


def universal_size_bytes(tag_dir: str) -> int:
    """Disk used by the tag's universal copy (for the cost figures in BENCHMARKS.md)."""
    return _dir_bytes(os.path.join(tag_dir, UNIVERSAL_DIR))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def not_convertible(tag_dir: str) -> str | None:
    """Why ``tag_dir`` is no tag ``ds_to_universal`` can convert (one line), or None.

    The conversion CLI was given a run or checkpoints folder, a mistyped path or a ZeRO-0 tag: it
    created the missing folder and ended in a traceback that called the checkpoint damaged.
    """
    example = "give a checkpoint's step folder, e.g. RUN/checkpoints/step_00000100"
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} is not a folder: {example}"
    if _has_optimizer_shards(tag_dir):
        return None
    if os.path.isfile(os.path.join(tag_dir, "mp_rank_00_model_states.pt")):
        return (
            f"{tag_dir} is a ZeRO-0 checkpoint (its optimizer sits in mp_rank_00_model_states.pt): it "
            "needs no conversion and resumes on another world size or train.precision as it is"
        )
    return f"{tag_dir} holds no DeepSpeed optimizer files (*_optim_states.pt): {example}"


def main(argv: list[str] | None = None) -> int:
    """``python -m vutrain.checkpoint_reshape TAG_DIR``: convert ahead of time and print the cost.

    The last output line is JSON: conversion seconds, bytes of the tag (without the universal
    copy) and of the universal copy. A copy already there is replaced only by a complete new one.
    A path that is no convertible tag, or a failed conversion, is one line on stderr (exit 2, 1).
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("tag_dir", help="a checkpoint tag directory, e.g. RUN/checkpoints/step_00000100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    problem = not_convertible(args.tag_dir)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        convert_to_universal(args.tag_dir, again=True)
    except UniversalConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    universal = universal_size_bytes(args.tag_dir)
    tag_bytes = _dir_bytes(args.tag_dir) - universal
    print(
        json.dumps(
            {"convert_s": round(seconds, 3), "checkpoint_bytes": tag_bytes, "universal_bytes": universal}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
