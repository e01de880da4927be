"""The start-up check that output_dir is one folder every rank sees (2 gloo ranks, the real Trainer):
a rank that does not see it stops every rank with one line before any step, and a start on one
shared folder trains and leaves no token behind.

As in test_review_checkpoint12.py, rank 1 passing another folder than rank 0 is what a node-local
output_dir (or a mount missing on one node) looks like from rank 1's node.
"""

from __future__ import annotations

import os
import socket

import pytest

from helpers_dist import run_distributed


def _start_and_train(run_dir: str, shards: dict) -> dict:
    """This rank's Trainer on ``run_dir``, trained 1 step: the steps it ran, or what stopped it."""
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    from inprocess_trainer import overrides

    cfg = load_config("tiny", overrides(shards, run_dir, 1, train__checkpoint_every=0, eval__every=0))
    try:
        trainer = Trainer(cfg, resolve_dist_env())
    except Exception as exc:  # recorded, not raised: the test compares what each rank said
        return {"error": f"{type(exc).__name__}: {exc}", "steps": 0}
    trainer.train()
    return {"error": None, "steps": trainer.step}


def _two_starts(rank: int, world: int, shards: dict, root: str) -> dict:
    """A start where both ranks pass ROOT/shared, then one where rank 1 passes ROOT/rank1_local.

    In this order, a start that goes wrong cannot derail the other: before the check, rank 1 failed
    alone in the second start while rank 0 went on into DeepSpeed's collectives (which then failed
    on its closed group instead of pairing with a next start's)."""
    shared = os.path.join(root, "shared")
    return {
        "shared": _start_and_train(shared, shards),
        "not_shared": _start_and_train(shared if rank == 0 else os.path.join(root, "rank1_local"), shards),
    }


@pytest.fixture(scope="module")
def starts(tiny_shards, tmp_path_factory):
    """(root, [rank 0's, rank 1's {case: outcome}]) from one pair of spawned ranks."""
    root = str(tmp_path_factory.mktemp("ckpt13"))
    # A collective that loses its peer fails within 60 s instead of hanging the test.
    return root, run_distributed(_two_starts, 2, tiny_shards, root, timeout_s=60)


def _tokens_under(folder: str) -> list[str]:
    from vutrain import checkpoint as ckpt

    return [os.path.join(d, ckpt.SAVE_TOKEN) for d, _, files in os.walk(folder) if ckpt.SAVE_TOKEN in files]


def test_an_output_dir_a_rank_does_not_see_stops_every_rank_at_start(starts):
    """Rank 1's node has no such folder. Before, rank 1 failed to load the preset tokenizer from it
    (transformers' "Repo id must be in the form ..." OSError) while rank 0 went on and failed with a
    gloo read error; over a tokenizer left there by an earlier run, or with a pretrained model, the
    run trained until its first checkpoint. Now both ranks raise the same one line before step 1."""
    root, (rank0, rank1) = starts
    host = socket.gethostname()
    expected = (
        f"ConfigError: the run did not start: 1 of 2 ranks (rank 1, on {host}) do not see "
        f"{os.path.join(root, 'shared')}, which rank 0 prepared on {host}, so their files would not be "
        "in it: output_dir must be one folder every node mounts (a shared file system such as NFS, "
        "Lustre or GPFS, not a node-local disk such as /tmp); set output_dir to one and rerun"
    )
    assert rank0["not_shared"] == rank1["not_shared"] == {"error": expected, "steps": 0}
    # Rank 1 wrote nothing on its own disk, and rank 0 removed its token although the check failed.
    assert not os.path.exists(os.path.join(root, "rank1_local"))
    assert _tokens_under(root) == []


def test_a_start_on_one_shared_output_dir_trains_and_leaves_no_token(starts):
    root, (rank0, rank1) = starts
    assert rank0["shared"] == rank1["shared"] == {"error": None, "steps": 1}
    shared = os.path.join(root, "shared")
    assert os.path.exists(os.path.join(shared, "metrics.jsonl"))
    assert _tokens_under(shared) == []
