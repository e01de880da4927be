"""Checkpoints that cannot half-exist: DeepSpeed's files plus the trainer's own per-rank state.

Format (version 1), under RUN/checkpoints/:

    step_00000100/                     one complete checkpoint (the "tag")
        <DeepSpeed's files>            mp_rank_*_model_states.pt, *_optim_states.pt (ZeRO shards
                                       of every rank): pickles, written by engine.save_checkpoint
        trainer_state_rank{R}.json     rank R's step, data stream position and RNG scalars (JSON)
        trainer_state_rank{R}.safetensors  rank R's RNG tensors (torch CPU/CUDA generator states);
                                       `.tensors.pt` (a tensor-only torch.save) without safetensors
        COMPLETE.json                  the marker, written last: format, step, tag, world_size,
                                       {relative path: size in bytes} of every other file, and
                                       tokenizer_vocab_sha256 when RUN/tokenizer holds a tokenizer
    latest                             the newest complete tag (written by us, after the marker)
    step_00000200.tmp/                 a save in progress, or one killed mid-write (never loaded;
                                       one killed after its marker is renamed at the next start)

A save goes: rank 0 makes ``<tag>.tmp`` with a random ``save_token`` in it, which every rank reads
back (a rank that cannot, on an output_dir that is not shared, stops every rank with one line);
every rank writes into ``<tag>.tmp`` (DeepSpeed through its ``tag`` argument, with
``save_latest=False``), a barrier, then rank 0 removes the token, lists the files and sizes, writes
COMPLETE.json, renames ``<tag>.tmp`` to ``<tag>`` and only then rewrites ``latest`` and prunes. A
kill at any point leaves either the previous complete checkpoints untouched or a new complete one;
never a directory named like a checkpoint that is not one.

Resume (``select_checkpoint``) scans the tags instead of trusting ``latest``: it takes the newest
one whose marker is present and whose files all exist with the listed sizes, logs which it took and
why each newer one was skipped, and raises a one-line ``CheckpointError`` naming the bad files when
checkpoints exist but none is usable (``train.resume=never`` starts afresh; the old checkpoints
are moved aside, never deleted). Retention (``prune``) counts complete checkpoints only, so the
last complete one is never deleted.

Loading the trainer's state never unpickles: JSON plus tensors (safetensors, or torch.load with
``weights_only=True``). DeepSpeed's own files are pickles: a run directory is trusted input.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch

from vutrain import checkpoint_reshape as reshape
from vutrain.checkpoint_precision import load_zero0
from vutrain.config import ConfigError
from vutrain.distributed import barrier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMPLETE.json"
# The marker's record of the preset tokenizer a checkpoint was trained with (`tokenizer_fingerprint`).
TOKENIZER_KEY = "tokenizer_vocab_sha256"
TMP_SUFFIX = ".tmp"
# In ``<tag>.tmp`` while a save of several ranks runs, and in the run directory while a Trainer of
# several ranks starts: rank 0's random token, which every rank must read back before it writes
# there (`check_every_rank_sees`); removed before the marker, and once read at start.
SAVE_TOKEN = "save_token"
# The run's metrics rows (vutrain/metrics.py), made durable with each checkpoint (`sync_metrics`).
METRICS_FILE = "metrics.jsonl"
TAG_RE = re.compile(r"^step_(\d+)$")
TMP_RE = re.compile(r"^step_(\d+)\.tmp$")
# The old copy of a tag saved again (`_complete`), deleted once the new copy is in place: a kill
# during that delete left a checkpoint's worth of disk that nothing removed.
REPLACED_RE = re.compile(r"^step_(\d+)\.replaced\.tmp$")
REPLACED_SUFFIX = ".replaced" + TMP_SUFFIX
# Folders train.resume=never (checkpoints, metrics, tokenizer) and roll-backs (checkpoints) move aside.
_ASIDE_CHECKPOINTS = "checkpoints.replaced-"
# Fault injection for tests (tests/test_faults_checkpoint.py): seconds to sleep after every rank
# wrote its files and before the marker, so a test can SIGKILL the run in the middle of a save.
_FAULT_SLEEP_ENV = "VUTRAIN_FAULT_SLEEP_BEFORE_MARKER"


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message is one line that says what to do."""


def tag_for(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str) -> str:
    """RUN/checkpoints."""
    return os.path.join(run_dir, "checkpoints")


def _step_of(tag: str) -> int:
    match = TAG_RE.match(tag) or TMP_RE.match(tag)
    return int(match.group(1)) if match else -1


def list_tags(ckpt_dir: str) -> list[str]:
    """Checkpoint directories named like a finished save (complete or not), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=_step_of)


def _list_tmp(ckpt_dir: str, pattern: re.Pattern = TMP_RE) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    names = [t for t in os.listdir(ckpt_dir) if pattern.match(t)]
    return sorted(names, key=lambda t: int(pattern.match(t).group(1)))


def latest_tag(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    for tag in reversed(list_tags(ckpt_dir)):
        if verify_tag(os.path.join(ckpt_dir, tag)) is None:
            return tag
    return None


# ----------------------------------------------------------------------------- the marker


def _files_and_sizes(tag_dir: str) -> dict[str, int]:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tag_dir)
            if rel != MARKER:
                files[rel] = os.path.getsize(path)
    return dict(sorted(files.items()))


def read_marker(tag_dir: str) -> dict | None:
    """The parsed COMPLETE.json of a tag directory, or None if absent or torn."""
    try:
        with open(os.path.join(tag_dir, MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def verify_tag(tag_dir: str) -> str | None:
    """None when the checkpoint is complete, else why not (one short phrase naming the file)."""
    name = os.path.basename(tag_dir)
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        return f"{name}/{MARKER} is missing (save interrupted, or written by an older vutrain)"
    marker = read_marker(tag_dir)
    if marker is None:
        return f"{name}/{MARKER} does not parse"
    if marker.get("format") != FORMAT_VERSION:
        return f"{name} has checkpoint format {marker.get('format')!r}, this vutrain reads {FORMAT_VERSION}"
    for rel, size in marker["files"].items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{name}/{rel} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{name}/{rel} has {actual} bytes, the marker says {size} (truncated or overwritten)"
    return None


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}{TMP_SUFFIX}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- trainer state


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the process saw when it saved. A resume can see fewer (another launcher,
        # CUDA_VISIBLE_DEVICES of one GPU per task, smaller nodes), and setting a state on a device
        # that does not exist fails: restore those that exist (training draws nothing from them).
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _split_rng(rng: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """RNG state as (JSON-able dict, tensors)."""
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    scalars = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng.torch": rng["torch"].contiguous()}
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = state.cpu().contiguous()
    return scalars, tensors


def _join_rng(scalars: dict, tensors: dict[str, torch.Tensor]) -> dict:
    version, internal, gauss = scalars["python"]
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    rng = {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors["rng.torch"],
    }
    cuda = [
        tensors[k]
        for k in sorted(
            (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
    ]
    if cuda:
        rng["cuda"] = cuda
    return rng


def _tensor_file(tag_dir: str, rank: int) -> str:
    try:
        import safetensors.torch  # noqa: F401

        return os.path.join(tag_dir, f"trainer_state_rank{rank}.safetensors")
    except ImportError:
        return os.path.join(tag_dir, f"trainer_state_rank{rank}.tensors.pt")


def save_trainer_state(tag_dir: str, rank: int, state: dict) -> None:
    """Write `state` (JSON-able, plus an "rng" entry from `rng_state`) as JSON + a tensor file."""
    state = dict(state)
    scalars, tensors = _split_rng(state.pop("rng"))
    state["rng"] = scalars
    path = _tensor_file(tag_dir, rank)
    if path.endswith(".safetensors"):
        _save_safetensors(tensors, path)
    else:
        torch.save(tensors, path)
    with open(os.path.join(tag_dir, f"trainer_state_rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(state, fh)


# How safetensors names the OS error of a refused write: "I/O error: File too large (os error 27)".
_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' save_file, with a refused write (a full disk, a quota, a folder that is gone)
    raised as the OSError it is.

    safetensors reports it as its own SafetensorError, neither OSError nor RuntimeError: a save on
    a full disk, whose first write is this file, stopped with a traceback instead of the one-line
    write failure (`save_checkpoint`), and the other ranks with a peer's error.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path)
    except SafetensorError as exc:
        code = _OS_ERROR_CODE.search(str(exc))
        if code is None:  # not the file system's refusal: no disk-space advice
            raise
        errnum = int(code.group(1))
        raise OSError(errnum, os.strerror(errnum), path) from exc


def load_trainer_state(tag_dir: str, rank: int) -> dict:
    """Read what `save_trainer_state` wrote, without unpickling anything."""
    json_path = os.path.join(tag_dir, f"trainer_state_rank{rank}.json")
    tensor_paths = [
        os.path.join(tag_dir, f"trainer_state_rank{rank}{ext}") for ext in (".safetensors", ".tensors.pt")
    ]
    tensor_path = next((p for p in tensor_paths if os.path.isfile(p)), None)
    if not os.path.isfile(json_path) or tensor_path is None:
        raise CheckpointError(
            f"{json_path} (or its tensor file) is missing: resume with the world size the "
            "checkpoint was written with, or start fresh with train.resume=never"
        )
    try:
        with open(json_path, encoding="utf-8") as fh:
            state = json.load(fh)
        if tensor_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(tensor_path)
        else:
            tensors = torch.load(tensor_path, weights_only=True)
        state["rng"] = _join_rng(state["rng"], tensors)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {json_path}: {type(exc).__name__}: {str(exc).splitlines()[0]}; "
            "resume from an older checkpoint with train.resume=<its directory>"
        ) from exc
    return state


# ----------------------------------------------------------------------------- save


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): one line that says what to do."""


# How torch.save's zip writer reports a failed write (a full disk, a quota, a file-size limit).
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch.save's writer failing; not, say, a CUDA out-of-memory in ZeRO-3's gather,
    for which "free space" would be the wrong advice."""
    return isinstance(exc, OSError) or any(p in str(exc) for p in _TORCH_WRITE_FAILURES)


def write_failure_message(ckpt_dir: str, tag: str, exc: BaseException) -> str:
    """Why checkpoint `tag` was not written, the space left, and how to go on from the last one.

    torch.save reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos
    74560 vs 74464", deep in DeepSpeed's traceback: the free space is what tells the user."""
    from vutrain.startup_errors import one_line

    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    latest = next_resume_tag(ckpt_dir)
    if latest == tag:  # failed after the marker (a rename): "could not be written ... continues from it"
        return (
            f"checkpoint {tag} is complete in {ckpt_dir}, but this rank failed after its marker was "
            f"written ({one_line(exc)}; {free}): rerun with train.resume=auto, which continues from {tag}"
        )
    return (
        f"checkpoint {tag} could not be written to {ckpt_dir} ({one_line(exc)}; {free}): free space "
        f"(or lower train.keep_checkpoints) and rerun with train.resume=auto, which continues from "
        f"{latest or 'the start: no checkpoint was complete'} (the partial {tag}{TMP_SUFFIX} is replaced)"
    )


def save_checkpoint(engine, run_dir: str, step: int, trainer_state: dict, rank: int, keep: int) -> str:
    """Save on every rank (ZeRO shards live on each); rank 0 completes, publishes and prunes.

    A write that fails here (a full disk, a quota) raises CheckpointWriteError; so does a peer that
    went away mid-save, with its own one line (the rank that failed says why)."""
    from vutrain.startup_errors import is_peer_failure

    ckpt_dir = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tmp_tag = tag + TMP_SUFFIX
    tmp_dir = os.path.join(ckpt_dir, tmp_tag)
    try:
        if rank == 0:
            # Before writing, not only after: a full disk's rerun (the write failure says to free
            # space or lower train.keep_checkpoints) failed again while the checkpoints beyond the
            # lowered keep and a failed save's partial .tmp of another step still held the space.
            prune(ckpt_dir, keep)
            os.makedirs(tmp_dir)  # prune removed a stale .tmp of this step: it lends no files
            write_shared_token(tmp_dir)
        barrier()
        check_every_rank_sees(tmp_dir, f"checkpoint {tag} was not saved")
        save_trainer_state(tmp_dir, rank, dict(trainer_state, rng=rng_state()))
        reshape.save_world_info(engine, tmp_dir, trainer_state)  # all ranks' data states (collective)
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"step": step}, save_latest=False)
        sync_files(tmp_dir)  # each rank flushes what it wrote: the marker below must not outlive it
        barrier()  # every rank's files are on disk before the marker says so
        if rank == 0:
            delay = float(os.environ.get(_FAULT_SLEEP_ENV, "0") or 0)
            if delay > 0:
                time.sleep(delay)
            # Every rank has read it: it is no part of the checkpoint.
            remove_shared_token(tmp_dir)
            sync_metrics(run_dir)
            _complete(ckpt_dir, tag, step)
            prune(ckpt_dir, keep)
        barrier()
    except CheckpointWriteError:  # already the one line (an output_dir some ranks do not see)
        raise
    except (OSError, RuntimeError) as exc:
        # A full disk often fails one rank's write while the others, done, wait in a barrier:
        # they printed a 20-line "Connection closed by peer" traceback under the failed rank's line.
        if is_peer_failure(exc):
            raise CheckpointWriteError(peer_failure_message(ckpt_dir, tag)) from exc
        if not is_write_failure(exc):
            raise
        raise CheckpointWriteError(write_failure_message(ckpt_dir, tag, exc)) from exc
    return tag


def sync_metrics(run_dir: str) -> None:
    """fsync ``RUN/metrics.jsonl`` (rank 0 writes it) before a checkpoint's marker.

    Its rows up to the checkpoint's step were appended before the save but could still sit in the
    page cache: a machine crash (a node lost, not a killed process) then left a complete checkpoint
    at step N and a metrics.jsonl that ended steps before it, and the resumed run, which logs from
    N + 1 on, never wrote the missing rows: a silent gap in the curves and the eval history."""
    path = os.path.join(run_dir, METRICS_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # no row yet (or metrics off on this rank)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shared_token(folder: str) -> None:
    """Rank 0: a random token in ``folder`` (a save's ``<tag>.tmp``, or the run directory at start),
    which every rank reads back (`check_every_rank_sees`); os.urandom leaves the RNG states a save
    records untouched. Nothing to check, and nothing written, in a world of one rank."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        with open(os.path.join(folder, SAVE_TOKEN), "w", encoding="utf-8") as fh:
            fh.write(os.urandom(16).hex())


def remove_shared_token(folder: str) -> None:
    """Rank 0, once every rank has read it: the token is no part of a checkpoint or of the run."""
    _remove_quietly(os.path.join(folder, SAVE_TOKEN))


def _read_shared_token(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, SAVE_TOKEN), encoding="utf-8") as fh:
            return fh.read()
    except (OSError, ValueError):  # no such folder or file here: not the folder rank 0 wrote to
        return None


def check_every_rank_sees(
    folder: str,
    stopped: str,
    error: type[Exception] = CheckpointWriteError,
    rank0_did: str = "made",
) -> None:
    """``error`` on every rank unless each one reads rank 0's token (`write_shared_token`) in
    ``folder``; its one line starts with ``stopped`` (what did not happen). Collective.

    A save checks its ``<tag>.tmp``, the folder every rank writes its own files into (its ZeRO
    shards and trainer state): an output_dir that is not one shared folder (a node-local disk, a
    mount missing on one node) trained until the first checkpoint, where the other nodes' ranks
    failed their first write with "free space" advice (or a safetensors traceback) while the others
    hung in a collective; over a stale ``<tag>.tmp`` of the same name on their disk they wrote into
    it, and rank 0 marked complete a checkpoint without their files. The Trainer checks the run
    directory at start, so that output_dir stops the run before its first step instead. Every rank
    raises the same line, from what all saw.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    import socket

    views: list = [None] * torch.distributed.get_world_size()
    mine = (socket.gethostname(), _read_shared_token(folder), os.path.abspath(folder))
    torch.distributed.all_gather_object(views, mine)
    host0, token0, written = views[0]  # rank 0's folder: the one the message names on every rank
    blind = [(r, host) for r, (host, token, _) in enumerate(views) if token is None or token != token0]
    if blind:
        raise error(_not_shared_message(written, stopped, rank0_did, host0, blind, len(views)))


def _not_shared_message(
    folder: str, stopped: str, rank0_did: str, host0: str, blind: list, world: int
) -> str:
    ranks = [r for r, _ in blind]
    listed = ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]} ... {ranks[-1]}"
    hosts = ", ".join(sorted({host for _, host in blind}))
    return (
        f"{stopped}: {len(ranks)} of {world} ranks (rank {listed}, on {hosts}) do not see {folder}, "
        f"which rank 0 {rank0_did} on {host0}, so their files would not be in it: output_dir must "
        "be one folder every node mounts (a shared file system such as NFS, Lustre or GPFS, not a "
        "node-local disk such as /tmp); set output_dir to one and rerun"
    )


def peer_failure_message(ckpt_dir: str, tag: str) -> str:
    """This rank's save stopped because another rank went away during it (that rank says why).

    Rank 0 can go away after it completed the checkpoint (killed while it pruned, or the other
    ranks' last barrier failed): the message said "was not completed ... continues from" that very
    checkpoint. And killed between the marker and the rename, it said the previous one, although
    the next start publishes this one and continues from it."""
    latest = next_resume_tag(ckpt_dir)
    if latest == tag:
        return (
            f"checkpoint {tag} is complete, but another rank stopped before the save ended (its own "
            f"error says why); rerun with train.resume=auto, which continues from {tag}"
        )
    return (
        f"checkpoint {tag} was not completed: another rank stopped during the save (its own error "
        f"says why); rerun with train.resume=auto, which continues from "
        f"{latest or 'the start: no checkpoint was complete'}"
    )


def next_resume_tag(ckpt_dir: str) -> str | None:
    """The checkpoint train.resume=auto takes at the next start: the newest complete one, counting
    a save killed after its marker, which that start publishes first (`finish_interrupted_publish`)."""
    complete = [t for t in (latest_tag(ckpt_dir), *complete_unpublished(ckpt_dir)) if t]
    return max(complete, key=_step_of, default=None)


def _complete(ckpt_dir: str, tag: str, step: int) -> None:
    """Marker, rename, `latest`: in that order, so each step leaves a consistent directory."""
    tmp_dir = os.path.join(ckpt_dir, tag + TMP_SUFFIX)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    marker = {
        "format": FORMAT_VERSION,
        "step": step,
        "tag": tag,
        "world_size": world,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": _files_and_sizes(tmp_dir),
    }
    vocab = tokenizer_fingerprint(os.path.join(os.path.dirname(ckpt_dir), "tokenizer"))
    if vocab is not None:  # a preset's tokenizer: the token ids of these embeddings
        marker[TOKENIZER_KEY] = vocab
    _atomic_write_text(os.path.join(tmp_dir, MARKER), json.dumps(marker, indent=1))
    _publish(ckpt_dir, tag)
    _point_latest_at(ckpt_dir, tag)
    _sync_dir(ckpt_dir)


def _point_latest_at(ckpt_dir: str, tag: str) -> None:
    """Rewrite `latest` after `tag` was published; a failure here loses nothing, so it warns.

    The checkpoint is complete once renamed, and resume scans the tags instead of trusting
    `latest`. Raised as a write failure, it stopped the run with "checkpoint step_X could not be
    written ... continues from step_X": the rerun then took the very checkpoint called unwritten.
    """
    path = os.path.join(ckpt_dir, "latest")
    try:
        _atomic_write_text(path, tag)
    except OSError as exc:
        _remove_quietly(path + TMP_SUFFIX)
        log.warning(
            "checkpoint %s is complete in %s, but 'latest' could not be updated (%s: %s; it still "
            "names %s): train.resume=auto takes %s anyway (it scans for the newest complete checkpoint)",
            tag,
            ckpt_dir,
            type(exc).__name__,
            exc,
            _read_latest(ckpt_dir) or "nothing",
            tag,
        )


def _read_latest(ckpt_dir: str) -> str | None:
    """The tag the `latest` file names, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except (OSError, ValueError):
        return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:  # absent, or not a file: nothing of ours to clean up
        pass


def _publish(ckpt_dir: str, tag: str) -> None:
    """Rename the complete ``<tag>.tmp`` to ``<tag>``, replacing an older copy of the same step."""
    tmp_dir, final = os.path.join(ckpt_dir, tag + TMP_SUFFIX), os.path.join(ckpt_dir, tag)
    replaced = None
    if os.path.exists(final):  # the same step saved again (e.g. a resumed run over a broken tag)
        # Two renames leave no checkpoint-less moment worth the name; the slow delete comes after.
        replaced = final + REPLACED_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp_dir, final)
    _sync_dir(ckpt_dir)  # the rename itself survives a crash
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def finish_interrupted_publish(ckpt_dir: str) -> list[str]:
    """Rank 0 at start, before any rank scans the tags: publish each ``<tag>.tmp`` whose marker is
    there and whose files check out, as `_complete` would have; returns those tags.

    The marker is written after every rank's files are on disk, so such a save is complete: a kill
    between the marker and the rename (or between the two renames of a step saved again) left it
    under its .tmp name, and the resume took the checkpoint before it, one interval lost.
    """
    finished = list(complete_unpublished(ckpt_dir))
    for tag in finished:
        _publish(ckpt_dir, tag)
    if finished:
        _point_latest_at(ckpt_dir, latest_tag(ckpt_dir))
        _sync_dir(ckpt_dir)
        log.warning("finished publishing the complete checkpoint(s) a killed save left as .tmp: %s", finished)
    return finished


def complete_unpublished(ckpt_dir: str) -> dict[str, str]:
    """{tag: its ``<tag>.tmp`` name} for each save killed after its marker but before its rename:
    complete (every rank's files are listed and there), and read-only readers such as the export
    may load it under that name; `finish_interrupted_publish` renames them at the next start."""
    found = {}
    for name in _list_tmp(ckpt_dir):
        tag, tmp_dir = name[: -len(TMP_SUFFIX)], os.path.join(ckpt_dir, name)
        marker = read_marker(tmp_dir)
        if marker is not None and marker.get("tag") == tag and verify_tag(tmp_dir) is None:
            found[tag] = name
    return found


def sync_files(directory: str) -> int:
    """fsync every file under ``directory`` and the directories themselves; returns the file count.

    A killed process loses nothing that write() returned, but a machine that crashes (power, a
    kernel panic) loses what is still in the page cache: without this a marker written later could
    survive while a file it lists came back full of zeros at the listed size, which the size check
    cannot see. On a shared file system each rank flushes the files it wrote (fsync of a file
    another client wrote is a cheap no-op)."""
    count = 0
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            count += 1
        _sync_dir(root)
    return count


def _sync_dir(path: str) -> None:
    """fsync a directory (its entries: new and renamed files); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep`, and stale .tmp directories (a killed
    save's, and the old copy of a re-saved tag whose delete was killed).

    Only complete checkpoints count towards `keep`, so a broken newer one never pushes the
    last good one out. Incomplete tag directories are left for the user to look at.
    """
    removed = []
    complete = [t for t in list_tags(ckpt_dir) if verify_tag(os.path.join(ckpt_dir, t)) is None]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        removed.append(old)
    for stale in _list_tmp(ckpt_dir) + _list_tmp(ckpt_dir, REPLACED_RE):
        shutil.rmtree(os.path.join(ckpt_dir, stale), ignore_errors=True)
        removed.append(stale)
    return removed


def remove_replaced_copies(ckpt_dir: str) -> list[str]:
    """Delete the old copies (``step_X.replaced.tmp``) whose new ``step_X`` is complete.

    A run killed while `_complete` deleted such a copy left it behind, and a run that then has
    nothing more to save (a finished run, rerun) never prunes. A copy whose ``step_X`` is not
    complete is kept: the kill came between the two renames, and it may be the step's only copy.
    """
    removed = []
    for leftover in _list_tmp(ckpt_dir, REPLACED_RE):
        tag = leftover[: -len(REPLACED_SUFFIX)]
        if verify_tag(os.path.join(ckpt_dir, tag)) is None:
            shutil.rmtree(os.path.join(ckpt_dir, leftover), ignore_errors=True)
            removed.append(leftover)
    if removed:
        log.warning("removed the old copies of re-saved checkpoints left by a killed run: %s", removed)
    return removed


# ----------------------------------------------------------------------------- resume


def _newest_complete(ckpt_dir: str, what: str, verbose: bool = True) -> tuple[str, str] | None:
    """(checkpoints dir, tag) of the newest complete checkpoint; logs skips; raises if none usable."""
    interrupted = [f"{t}: save interrupted (never completed)" for t in _list_tmp(ckpt_dir)]
    skipped = list(interrupted)
    # Unreadable counts as missing: a torn `latest` (not UTF-8) stopped every resume with a
    # UnicodeDecodeError traceback, although the scan never needs it.
    named = _read_latest(ckpt_dir)
    if named and not os.path.isdir(os.path.join(ckpt_dir, named)):
        skipped.append(f"'latest' names {named}, which is gone")
    chosen = None
    for tag in reversed(list_tags(ckpt_dir)):
        problem = verify_tag(os.path.join(ckpt_dir, tag))
        if problem is None:
            chosen = tag
            break
        skipped.append(problem)
    for reason in skipped if verbose else []:
        log.warning("checkpoint skipped: %s", reason)
    if chosen is None:
        if len(skipped) > len(interrupted):  # a checkpoint was completed once: never start over silently
            raise CheckpointError(
                f"{what}: checkpoints exist in {ckpt_dir} but none is complete ({'; '.join(skipped)}). "
                "Point train.resume at a good checkpoint directory, or set train.resume=never to start "
                "from scratch (the old checkpoints are moved aside, not deleted)."
            )
        return None
    why = "the newest complete checkpoint"
    if named != chosen:
        why += f"; the 'latest' file names {named!r}" if named else "; the 'latest' file is missing"
    if verbose:
        log.warning("resuming from %s (%s)", os.path.join(ckpt_dir, chosen), why)
    return ckpt_dir, chosen


def resolve_resume(resume: str, run_dir: str, verbose: bool = True) -> tuple[str, str] | None:
    """(checkpoints dir, tag) to load, or None to start fresh.

    resume: "auto" (newest complete checkpoint of this run, if it has any), "never", a tag
    directory (RUN/checkpoints/step_00000100) or a checkpoints directory (its newest complete one).
    Raises CheckpointError when checkpoints exist but none is usable. Every rank calls this and
    gets the same answer (it reads files only); `verbose` (rank 0) logs the choice and the skips.
    """
    if resume == "never":
        return None
    if _is_first_rank():  # the others never look at these copies, so no barrier is needed
        remove_replaced_copies(checkpoints_dir(run_dir))
    if resume == "auto":
        return _newest_complete(checkpoints_dir(run_dir), "train.resume=auto", verbose)
    path = os.path.abspath(resume)
    is_tag = TAG_RE.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, MARKER))
    if os.path.isdir(path) and is_tag:
        problem = verify_tag(path)
        if problem is not None:
            raise CheckpointError(f"train.resume={resume}: {problem}. Choose another checkpoint directory.")
        return os.path.dirname(path), os.path.basename(path)
    found = _newest_complete(path, f"train.resume={resume}", verbose) if os.path.isdir(path) else None
    if found is None:
        raise CheckpointError(
            f"train.resume={resume}: no checkpoint there (expected a checkpoints/ "
            "directory or a step_XXXXXXXX directory with a COMPLETE.json marker)"
        )
    return found


def _is_first_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def run_dir_of(resume: str) -> str:
    """The run directory a train.resume path belongs to (a tag or a checkpoints directory)."""
    return os.path.dirname(_checkpoints_dir_of(resume))


def _checkpoints_dir_of(resume: str) -> str:
    path = os.path.abspath(resume)
    if TAG_RE.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, MARKER)):
        path = os.path.dirname(path)
    return path


def resume_tokenizer_dir(resume: str) -> str:
    """The tokenizer folder of the run that wrote train.resume's checkpoints.

    train.resume=never moves ``checkpoints/`` and ``tokenizer/`` aside with one suffix
    (`move_aside`), and the new run trains another tokenizer into ``tokenizer/``: a resume from
    ``checkpoints.replaced-S/`` took that one, whose token ids are not the checkpoint's.
    Checkpoints set aside alone (`set_aside_later`, no tokenizer of their suffix) are this run's,
    unless a later train.resume=never moved that tokenizer aside too: a checkpoint that records
    its tokenizer (`TOKENIZER_KEY`) takes the folder of its run that holds it.
    """
    checkpoints = _checkpoints_dir_of(resume)
    run, name = os.path.dirname(checkpoints), os.path.basename(checkpoints)
    default = os.path.join(run, "tokenizer")
    if name.startswith(_ASIDE_CHECKPOINTS):
        aside = os.path.join(run, "tokenizer" + name[len("checkpoints") :])
        if os.path.isdir(aside):
            default = aside
    expected = recorded_tokenizer(resume)
    if expected is None or tokenizer_fingerprint(default) in (None, expected):
        return default
    return next((d for d in _tokenizer_folders(run) if tokenizer_fingerprint(d) == expected), default)


def _tokenizer_folders(run: str) -> list[str]:
    """RUN/tokenizer, then the folders train.resume=never moved aside, newest first."""
    asides = sorted((n for n in _listdir(run) if n.startswith("tokenizer.replaced-")), reverse=True)
    return [os.path.join(run, n) for n in ["tokenizer", *asides]]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def tokenizer_fingerprint(tok_dir: str) -> str | None:
    """sha256 of what fixes a saved tokenizer's token ids: ``tokenizer.json``'s vocabulary, merges
    and added tokens; None when it has no readable ``tokenizer.json``.

    Not of the file's bytes: an export saves the same tokenizer again (a restore from it is
    advised), with other padding and truncation settings, and newer `tokenizers` write merges as
    pairs instead of "a b" strings.
    """
    try:
        with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as fh:
            data = json.load(fh)
        model = data["model"]
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
        ids = {"vocab": model["vocab"], "merges": merges, "added_tokens": added}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode("utf-8")).hexdigest()


def recorded_tokenizer(resume: str) -> str | None:
    """The tokenizer fingerprint in the marker of the checkpoint train.resume (a tag or a
    checkpoints directory) loads; None for checkpoints saved without one (older runs, pretrained
    models) or when there is no usable checkpoint (`resolve_resume` says so, later)."""
    path = os.path.abspath(resume)
    if not (TAG_RE.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, MARKER))):
        try:
            found = _newest_complete(path, f"train.resume={resume}", verbose=False)
        except CheckpointError:
            return None
        if found is None:
            return None
        path = os.path.join(*found)
    marker = read_marker(path)
    value = marker.get(TOKENIZER_KEY) if marker else None
    return value if isinstance(value, str) else None


def check_tokenizer_is_recorded(resume: str, tok_dir: str, expected: str | None) -> None:
    """ConfigError when ``tok_dir`` loads but is not the tokenizer train.resume's checkpoint
    records (`expected`): its embeddings would read other words under the same token ids."""
    actual = tokenizer_fingerprint(tok_dir)
    if expected is None or actual is None or actual == expected:
        return
    run = os.path.dirname(_checkpoints_dir_of(resume))
    match = next((d for d in _tokenizer_folders(run) if tokenizer_fingerprint(d) == expected), None)
    where = f"{match} holds it" if match else "no tokenizer folder of that run holds it"
    raise ConfigError(
        f"train.resume={resume} was trained with another tokenizer than {tok_dir} (vocabulary sha256 "
        f"{expected[:12]} recorded in its {MARKER}, {actual[:12]} there; {where}): put that run's "
        f"tokenizer folder in {tok_dir} (an export of that run holds the same tokenizer), or resume "
        "into a new output_dir, or set train.resume=never to start afresh."
    )


def adopt_tokenizer(resume: str, run_dir: str) -> str | None:
    """A preset's tokenizer for a run resumed from another run's checkpoint: that run's, copied.

    The token ids of the checkpoint's embeddings are that tokenizer's; this run trained its own
    on its own shards, template and vocab size, which matched the checkpoint only by chance (same
    size: wrong ids without a word; another size: a shape error inside DeepSpeed). A local one
    that loads is kept (an earlier start adopted it); one that does not load is replaced, since
    it would otherwise be retrained from this run's data. Returns the copy.
    """
    adoption = tokenizer_to_adopt(resume, run_dir)
    return None if adoption is None else copy_adopted_tokenizer(resume, *adoption)


def tokenizer_to_adopt(resume: str, run_dir: str) -> tuple[str, str, str | None] | None:
    """(source, target, why the target does not load) for adopt_tokenizer; None: nothing to copy.

    Reads files only and raises the same ConfigError on every rank, so a multi-rank start calls
    it on all of them before rank 0 copies: raised on rank 0 alone, the others waited at the next
    barrier until the launcher's timeout killed them.
    """
    if resume == "never":
        return None
    if resume == "auto":  # this run's checkpoints and tokenizer (a folder restored by hand?)
        check_tokenizer_is_recorded(
            checkpoints_dir(run_dir),
            os.path.join(run_dir, "tokenizer"),
            recorded_tokenizer(checkpoints_dir(run_dir)),
        )
        return None
    source = resume_tokenizer_dir(resume)
    target = os.path.join(run_dir, "tokenizer")
    same = os.path.realpath(source) == os.path.realpath(target)
    if not same and os.path.realpath(os.path.dirname(source)) == os.path.realpath(run_dir):
        check_own_aside_tokenizer(resume, source, target)
        return None
    expected = recorded_tokenizer(resume)
    local_damage = tokenizer_load_error(target) if os.path.exists(target) else "missing"
    if not os.path.isfile(os.path.join(source, "tokenizer.json")):
        if local_damage is None:  # a tokenizer put in place by hand (or adopted by an earlier start)
            check_tokenizer_is_recorded(resume, target, expected)
            return None
        raise ConfigError(missing_resume_tokenizer_message(resume, source, target, same))
    check_tokenizer_is_recorded(resume, source, expected)
    if same or local_damage is None:
        check_tokenizer_is_recorded(resume, target, expected)  # a kept local one must be it too
        return None
    check_resume_tokenizer_loads(resume, source)
    return source, target, None if local_damage == "missing" else local_damage


def check_own_aside_tokenizer(resume: str, source: str, target: str) -> None:
    """ConfigError unless ``target`` holds the same tokenizer as ``source``, the one this run
    directory's set-aside checkpoints were trained with: ``target`` was trained again after
    train.resume=never, and this run's checkpoints (and metrics) belong to it."""
    if _same_file(os.path.join(source, "tokenizer.json"), os.path.join(target, "tokenizer.json")):
        return
    raise ConfigError(
        f"train.resume={resume} was trained with {source}, not with {target} (trained again after "
        "train.resume=never, and used by this run's newer checkpoints): resume it into a new "
        "output_dir, which takes its tokenizer, or copy the whole run directory and resume the copy"
    )


def _same_file(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:  # one of them is missing
        return False


def missing_resume_tokenizer_message(resume: str, source: str, target: str, same: bool) -> str:
    """A preset resumed from a checkpoint whose run has no tokenizer: a retrained one (this run's
    data, template and vocab size) could give other token ids than the checkpoint's embeddings."""
    where = f"{target}/tokenizer.json is missing" if same else f"{source}/tokenizer.json not found"
    return (
        f"train.resume={resume}: {where}, and that checkpoint's text embeddings use the token ids "
        "of the run that trained it, which a tokenizer trained again may not reproduce. Copy that "
        f"run's tokenizer folder (or the one in an export of it) to {target}, or set "
        "train.resume=never to start afresh."
    )


def copy_adopted_tokenizer(resume: str, source: str, target: str, local_damage: str | None) -> str:
    """Rank 0: copy the resumed run's tokenizer to ``target`` (from tokenizer_to_adopt); returns it."""
    # A copy killed midway left files in the .tmp; copied over, they joined the adopted tokenizer
    # (a stale special_tokens_map.json changes its padding token).
    shutil.rmtree(target + ".tmp", ignore_errors=True)
    shutil.copytree(source, target + ".tmp")
    if local_damage is not None:
        # Kept, not deleted: the user's files (hand-edited, or the only copy of another run's).
        # A kill between these two renames leaves no tokenizer, and the next start adopts it again.
        damaged = _unused_name(target + ".damaged-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        os.rename(target, damaged)
        log.warning(
            "%s does not load (%s): replacing it with %s, the tokenizer of train.resume=%s (the "
            "damaged folder is kept as %s)",
            target,
            local_damage,
            source,
            resume,
            damaged,
        )
    os.replace(target + ".tmp", target)
    if local_damage is None:
        log.info("train.resume=%s: using that run's tokenizer (%s), copied to %s", resume, source, target)
    return target


def _unused_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


def check_resume_tokenizer_loads(resume: str, source: str) -> None:
    """ConfigError when the resumed run's tokenizer does not load: copied, this run would retrain
    it from its own data, with token ids the checkpoint's embeddings may not have."""
    damage = tokenizer_load_error(source)
    if damage is not None:
        raise ConfigError(
            f"{source}, the tokenizer of train.resume={resume}, does not load ({damage}) and that "
            "checkpoint's embeddings use its token ids, which a retrained tokenizer may not reproduce. "
            "Restore that folder from a copy (an export of that run holds the same tokenizer files)."
        )


def tokenizer_load_error(tok_dir: str) -> str | None:
    """Why the saved tokenizer in ``tok_dir`` does not load, in one line; None when it loads."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(tok_dir)
    except Exception as exc:  # a JSON error, a tokenizers parse error, an unreadable file
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return None


def move_aside(run_dir: str) -> list[str]:
    """train.resume=never on a used run directory: keep the old checkpoints, metrics and preset
    tokenizer (the token ids of those checkpoints), renamed."""
    suffix = _unused_replaced_suffix(run_dir)
    moved = {}
    for name in _MOVED_ASIDE:
        if os.path.exists(os.path.join(run_dir, name)):
            target, linked = _with_suffix(run_dir, name, suffix), os.path.islink(os.path.join(run_dir, name))
            if not (linked and _move_linked_aside(run_dir, name, target)):
                os.rename(os.path.join(run_dir, name), target)
            moved[name] = target
    for name, target in moved.items():
        log.warning("train.resume=never: moved the previous run's %s aside to %s", name, target)
    return list(moved.values())


def _move_linked_aside(run_dir: str, name: str, target: str) -> bool:
    """Move the folder the link ``RUN/name`` points to aside, beside itself, and link ``target`` to
    it; the link keeps pointing at a new, empty folder where the old one was. False (nothing
    moved) where that parent folder is not writable: the caller renames the link, as before.

    ``RUN/checkpoints`` linked to a scratch file system had the link itself renamed, and the new
    run made a plain ``RUN/checkpoints`` in the run directory: its checkpoints went, without a
    word, to the file system the link was there to spare (a small quota, filled hours later)."""
    link = os.path.join(run_dir, name)
    real, moved = os.path.realpath(link), _beside_real_folder(link, target)
    try:
        os.rename(real, moved)
    except OSError as exc:  # e.g. a link to /scratch/$USER itself, in an unwritable /scratch
        log.warning(
            "train.resume=never: cannot move %s aside beside itself (%s): renaming the link %s instead, "
            "so this run writes a new %s in %s; link it again to keep it elsewhere",
            real,
            exc,
            link,
            name,
            run_dir,
        )
        return False
    os.makedirs(real)
    os.symlink(moved, target, target_is_directory=True)
    return True


def _unused_replaced_suffix(run_dir: str) -> str:
    """``.replaced-<UTC time>[-n]``, free for checkpoints, metrics and tokenizer alike: one suffix
    for all that move together, so a resume from ``checkpoints.replaced-S`` finds its tokenizer as
    ``tokenizer.replaced-S``, and never one that moved with other checkpoints.

    Two fresh starts within one second (the benchmarks build one Trainer per configuration in one
    run directory) took a name already there: an OSError ("Directory not empty") in rename; and
    checkpoints taken alone (`set_aside_later`) gave the others another suffix than theirs."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix, n = f".replaced-{stamp}", 1
    while any(os.path.exists(_with_suffix(run_dir, name, suffix)) for name in _MOVED_ASIDE):
        suffix, n = f".replaced-{stamp}-{n}", n + 1
    return suffix


def _with_suffix(run_dir: str, name: str, suffix: str) -> str:
    stem, ext = os.path.splitext(name)
    return os.path.join(run_dir, f"{stem}{suffix}{ext}")


# metrics.discarded.jsonl too: left behind, the old run's discarded rows mixed with the new run's.
_MOVED_ASIDE = ("checkpoints", "metrics.jsonl", "metrics.discarded.jsonl", "tokenizer")


def set_aside_later(run_dir: str, loaded_dir: str, step: int) -> list[str]:
    """After a resume from an explicit train.resume path at `step`: move this run's checkpoints of
    that step and later (except the one loaded) to ``checkpoints.replaced-<UTC time>/``.

    They belong to the continuation the resume rolled back from, whose metrics rows already moved
    out. Left in place, the next train.resume=auto (a SLURM requeue appends it) took the newest of
    them and the run jumped back to the abandoned weights, the new continuation's steps lost.
    """
    own = checkpoints_dir(run_dir)
    loaded = os.path.realpath(loaded_dir)
    later = [
        t for t in list_tags(own) if _step_of(t) >= step and os.path.realpath(os.path.join(own, t)) != loaded
    ]
    if not later:
        return []
    # Not a suffix a move_aside took in the same second: its tokenizer is not these checkpoints'.
    aside = _with_suffix(run_dir, "checkpoints", _unused_replaced_suffix(run_dir))
    _make_aside_folder(own, aside)
    for tag in later:
        os.rename(os.path.join(own, tag), os.path.join(aside, tag))
    latest_path, newest = os.path.join(own, "latest"), latest_tag(own)
    if newest:  # `latest` must not name a checkpoint that moved away (resume would call it gone)
        _point_latest_at(own, newest)
    elif os.path.exists(latest_path):
        os.remove(latest_path)
    _sync_dir(own)
    log.warning(
        "resumed from %s at step %d: moved this run's later checkpoints (%s) aside to %s, so "
        "train.resume=auto continues from here",
        loaded_dir,
        step,
        ", ".join(later),
        aside if not os.path.islink(aside) else f"{aside} (a link to {os.path.realpath(aside)})",
    )
    return [os.path.join(aside, t) for t in later]


def _make_aside_folder(own: str, aside: str) -> None:
    """Make ``aside`` (in the run directory) a folder that ``own``'s tags can be renamed into.

    ``RUN/checkpoints`` is often a link to a scratch file system (the checkpoints are large, the
    run directory's quota small): a rename from there into ``RUN`` failed with "Invalid cross-device
    link" after the resume had loaded, on rank 0 alone. The folder is then made beside the real
    checkpoints folder, on its file system, and ``aside`` is a link to it, so a resume from
    ``RUN/checkpoints.replaced-S/step_X`` still finds this run's tokenizer."""
    parent = os.path.dirname(aside)
    if os.stat(own).st_dev == os.stat(parent).st_dev:
        os.makedirs(aside)
        return
    real = _beside_real_folder(own, aside)
    os.makedirs(real)
    os.symlink(real, aside, target_is_directory=True)


def _beside_real_folder(link: str, name: str) -> str:
    """An unused path named like ``name`` beside the folder ``link`` resolves to (its file system)."""
    return _unused_name(os.path.join(os.path.dirname(os.path.realpath(link)), os.path.basename(name)))


def saved_world_size(tag_dir: str, default: int) -> int:
    """The number of ranks that wrote the tag: its marker, else world.json or its optimizer files.

    A marker without ``world_size`` (hand-made, or from an older vutrain) was taken as written by
    this world: on another one, DeepSpeed's plain loader read rank 0's files only and the other
    ranks' data positions were lost.
    """
    saved = read_marker(tag_dir).get("world_size")
    if isinstance(saved, int) and saved > 0:
        return saved
    return reshape.saved_world_size(tag_dir) or default


ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")


def zero_stage_of_files(tag_dir: str) -> int | None:
    """The ZeRO stage that wrote a tag, from DeepSpeed's file names: 3 (a model file per rank), 0 (one
    model file, no optimizer files), 1 or 2 (1: their layout is the same), None if unclear (bf16
    optimizer files: DeepSpeed's BF16_Optimizer writes them at ZeRO-0 too)."""
    names = os.listdir(tag_dir)
    if any(ZERO3_MODEL_FILE.match(n) for n in names):
        return 3
    if "mp_rank_00_model_states.pt" not in names:
        return None
    optim = [m for n in names if (m := OPTIM_FILE.match(n))]
    if any(m.group(1) for m in optim):
        return None
    return 1 if optim else 0


def check_zero_stage_of_files(tag_dir: str, stage: int) -> None:
    """check_zero_stage for a tag without world.json (an older vutrain): its files tell the stage.

    Such a tag on another stage failed inside DeepSpeed with "AssertionError: ",
    "FileNotFoundError: .../zero_pp_rank_0_mp_rank_00_optim_states.pt" or "'NoneType' object has no
    attribute 'copy'", and the advice to try an older checkpoint, which fails the same way.
    """
    if os.path.isfile(os.path.join(tag_dir, reshape.WORLD_FILE)):
        return  # reshape.check_zero_stage read its zero_stage
    saved = zero_stage_of_files(tag_dir)
    if saved is None or saved == stage or {saved, stage} <= {1, 2}:
        return
    same = "train.zero_stage=1 or 2" if saved == 1 else f"train.zero_stage={saved}"
    raise reshape.ResumeShapeError(
        f"{tag_dir} was written with ZeRO stage {'1 or 2' if saved == 1 else saved} (its files say so; "
        f"it has no {reshape.WORLD_FILE}) and this run has train.zero_stage={stage}: DeepSpeed cannot "
        f"load it into that stage; resume with {same}"
    )


def load_checkpoint(engine, ckpt_dir: str, tag: str, rank: int) -> dict:
    """Restore engine (weights, optimizer, LR schedule) and return this rank's trainer state."""
    tag_dir = os.path.join(ckpt_dir, tag)
    problem = verify_tag(tag_dir)
    if problem is not None:
        raise CheckpointError(f"{problem}; point train.resume at another checkpoint")
    reshape.check_zero_stage(tag_dir, engine.zero_optimization_stage())
    check_zero_stage_of_files(tag_dir, engine.zero_optimization_stage())
    reshape.check_model(tag_dir, engine.module)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rank == 0:
        reshape.finish_interrupted_replace(tag_dir)
    if saved_world_size(tag_dir, world) != world:  # written by another number of ranks
        try:
            return reshape.load_reshaped(engine, ckpt_dir, tag)
        except reshape.UniversalConversionError as exc:  # the one-line start-up error, as below
            raise CheckpointError(str(exc)) from exc
    state = load_trainer_state(tag_dir, rank)
    state["data"] = reshape.data_state_on_same_world(engine, tag_dir, state["data"])
    try:
        if reshape.precision_changed(engine, tag_dir):
            # train.precision changed (fp32 <-> bf16, as the non-finite-loss error suggests): before,
            # DeepSpeed's "FileNotFoundError: .../bf16_zero_pp_rank_0_..." on every checkpoint.
            reshape.load_universal(engine, tag_dir, rank)
            load_path = tag_dir
        elif engine.zero_optimization_stage() == 0:  # the optimizer sits in the model file
            load_path = load_zero0(engine, ckpt_dir, tag)
        else:
            load_path, _ = engine.load_checkpoint(
                ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except ConfigError:
        raise
    except reshape.UniversalConversionError as exc:  # its own advice, not "an older checkpoint"
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:
        raise CheckpointError(
            f"DeepSpeed could not load {tag_dir}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; point train.resume at an "
            "older checkpoint"
        ) from exc
    if load_path is None:
        raise CheckpointError(
            f"DeepSpeed could not load {tag_dir}; point train.resume at an older checkpoint"
        )
    set_rng_state(state.pop("rng"))
    log.info("resumed from %s at step %d", tag_dir, state["step"])
    return state
