"""Review of the trainer's start-up (11): node-local validation copies that differ stop the run at
step 0, through train.py's `main` on 2 real gloo ranks, each reading the same relative
data.val_shards from its own "node" directory."""

from __future__ import annotations

import contextlib
import io
import os
import shutil

from helpers_dist import run_distributed

SPEC = "val/{00000..00001}.tar"  # relative: each rank reads it from its own "node" directory


def _node_copies(root) -> list[str]:
    """Two node-local copies of one held-out set (2 shards); rank 1's shard 1 is truncated."""
    from vutrain.data.synthetic import write_synthetic

    write_synthetic(str(root / "node0"), num_samples=64, shard_size=16, image_size=16, val_samples=24, seed=0)
    shutil.copytree(root / "node0" / "val", root / "node1" / "val")
    shard = str(root / "node1" / "val" / "00001.tar")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    return [str(root / "node0"), str(root / "node1")]


def _main_on_node(rank: int, world_size: int, nodes: list[str], run_dir: str) -> dict:
    """train.py's main on this rank, from its node's directory: exit code and stderr."""
    from vutrain import train as train_py

    from inprocess_trainer import overrides

    train_py.QUIET_EXIT_DELAY_S = 0.0  # the quiet rank's wait for the launcher: nothing to wait for here
    os.chdir(nodes[rank])
    shards = {"train_shards": os.path.join(nodes[0], "train", "{00000..00003}.tar"), "val_shards": SPEC}
    run = overrides(shards, run_dir, 2, eval__every=0, train__checkpoint_every=0, train__micro_batch_size=4)
    argv = ["--config", "tiny", *run]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = train_py.main(argv)
    return {"code": code, "stderr": stderr.getvalue()}


def test_differing_val_copies_stop_the_run_at_start_up_in_one_line(tmp_path):
    """Rank 1's node-local copy of the held-out set holds shard 1 truncated (the same names, so the
    check before the process group passes). Each rank only expanded the spec at start-up, so the
    run trained until its first eval (here the final one, after step 2; in a job hours in). Now
    both ranks stop before the run directory exists: exit 2, rank 0 prints one `error:` line naming
    rank 1, the shard and its sizes, rank 1 prints nothing."""
    nodes = _node_copies(tmp_path)
    run_dir = str(tmp_path / "run")
    rank0, rank1 = run_distributed(_main_on_node, 2, nodes, run_dir, init_process_group=False, timeout_s=60)
    assert rank0["code"] == 2 and rank1["code"] == 2, (rank0, rank1)
    errors = [line for line in rank0["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in rank0["stderr"], rank0["stderr"]
    assert errors[0].startswith("error: data.val_shards differ between ranks"), errors
    assert "rank 1" in errors[0] and "val/00001.tar" in errors[0] and "bytes" in errors[0], errors
    assert "error" not in rank1["stderr"], rank1["stderr"]
    assert not os.path.exists(run_dir), sorted(os.listdir(run_dir))  # no step trained, nothing written
