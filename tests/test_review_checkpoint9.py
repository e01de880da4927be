"""Checkpoints review 9: what a failed or torn `latest` file does to a save and to a resume.

Real DeepSpeed engines on CPU gloo ranks and real files: `latest` is made unwritable by a directory
standing where its temporary file goes, as a full disk or a quota would fail that write.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from test_review_checkpoint8 import _engine

from helpers_dist import run_distributed


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _save_with_latest_unwritable(rank, world, run_dir):
    """Save step 2, block `latest`'s rewrite, save step 4, then unblock and save step 6 (keep 2)."""
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    records = _Records()
    logging.getLogger("vutrain.checkpoint").addHandler(records)
    engine = _engine(1, world)
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=2)
    blocker = os.path.join(ckpt_dir, "latest" + ckpt.TMP_SUFFIX)
    if rank == 0:
        os.makedirs(blocker)
    torch.distributed.barrier()
    try:
        ckpt.save_checkpoint(engine, run_dir, 4, {"step": 4, "data": {}}, rank, keep=2)
    except Exception as exc:  # returned at once: the ranks' collectives no longer pair up
        return {"raised": f"{type(exc).__name__}: {exc}"}
    with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as fh:
        latest_after_4 = fh.read()
    resumed_after_4 = ckpt.resolve_resume("auto", run_dir, verbose=False)[1]
    torch.distributed.barrier()
    if rank == 0:
        os.rmdir(blocker)
    torch.distributed.barrier()
    ckpt.save_checkpoint(engine, run_dir, 6, {"step": 6, "data": {}}, rank, keep=2)
    with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as fh:
        latest_after_6 = fh.read()
    return {
        "raised": None,
        "latest_after_4": latest_after_4,
        "resumed_after_4": resumed_after_4,
        "latest_after_6": latest_after_6,
        "tags": ckpt.list_tags(ckpt_dir),
        "warnings": records.lines,
    }


def test_a_latest_that_cannot_be_rewritten_does_not_call_the_saved_checkpoint_unwritten(tmp_path):
    """Before, the run stopped with "checkpoint step_00000004 could not be written ... continues from
    step_00000004" (and rank 1 with "was not completed"), although the checkpoint was complete and the
    rerun took it: now it warns that the checkpoint is complete and `latest` is stale, and trains on."""
    results = run_distributed(
        _save_with_latest_unwritable, 2, str(tmp_path / "run"), init_process_group=False, timeout_s=60
    )
    for rank, got in enumerate(results):
        assert got["raised"] is None, (rank, got["raised"])
        assert got["latest_after_4"] == "step_00000002"
        assert got["resumed_after_4"] == "step_00000004"
        assert got["latest_after_6"] == "step_00000006"
        assert got["tags"] == ["step_00000004", "step_00000006"]  # keep=2 pruned as usual
    said = [w for w in results[0]["warnings"] if "'latest' could not be updated" in w]
    assert len(said) == 1 and "step_00000004 is complete" in said[0], results[0]["warnings"]
    assert "still names step_00000002" in said[0]


def _hand_made_checkpoint(ckpt_dir: str, step: int) -> str:
    from vutrain import checkpoint as ckpt

    tag = ckpt.tag_for(step)
    os.makedirs(os.path.join(ckpt_dir, tag))
    with open(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"weights")
    marker = {
        "format": ckpt.FORMAT_VERSION,
        "step": step,
        "tag": tag,
        "files": {"mp_rank_00_model_states.pt": 7},
    }
    with open(os.path.join(ckpt_dir, tag, ckpt.MARKER), "w", encoding="utf-8") as fh:
        json.dump(marker, fh)
    return tag


def test_a_latest_file_that_is_not_text_does_not_stop_the_resume(tmp_path):
    """A `latest` torn by a crash (bytes that are not UTF-8) stopped every train.resume=auto with a
    UnicodeDecodeError traceback, though the resume scans the tags and never needs it."""
    from vutrain import checkpoint as ckpt

    run_dir = str(tmp_path / "run")
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    _hand_made_checkpoint(ckpt_dir, 2)
    newest = _hand_made_checkpoint(ckpt_dir, 4)
    with open(os.path.join(ckpt_dir, "latest"), "wb") as fh:
        fh.write(b"\xff\xfe\x00step")
    assert ckpt.resolve_resume("auto", run_dir) == (ckpt_dir, newest)
    assert ckpt.resolve_resume(ckpt_dir, run_dir) == (ckpt_dir, newest)
