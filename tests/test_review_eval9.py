"""Review of the eval area (9): ranks that see different validation shards (node-local copies)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from helpers_dist import run_distributed

SPEC = "val/{00000..00001}.tar"  # relative: each rank reads it from its own "node" directory
PROCESSOR = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}


def _tokenize(texts: list[str]) -> dict:
    ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _node_copies(root, damage: str) -> list[str]:
    """Two node-local copies of one held-out set (2 shards), as a per-node staging step makes;
    rank 1's copy of shard 1 is missing or truncated with `damage`."""
    from vutrain.data.synthetic import write_synthetic

    write_synthetic(str(root / "node0"), num_samples=4, shard_size=4, image_size=16, val_samples=6, seed=0)
    shutil.copytree(root / "node0" / "val", root / "node1" / "val")
    shard = str(root / "node1" / "val" / "00001.tar")
    if damage == "missing":
        os.remove(shard)
    elif damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    return [str(root / "node0"), str(root / "node1")]


def _first_eval_on_node(rank: int, world_size: int, nodes: dict[str, list[str]]) -> dict[str, str]:
    """Per case, the first eval's error on this rank as "Type: message" ("" if none); "intact"
    only runs the agreement (its eval needs a model)."""
    from vutrain.config import RunConfig
    from vutrain.evaluate import Evaluator, agree_on_val_shards

    cfg = RunConfig()
    cfg.data.val_shards = SPEC
    errors = {}
    for case, dirs in nodes.items():
        os.chdir(dirs[rank])  # the same data.val_shards, another filesystem
        evaluator = Evaluator(cfg, rank, world_size, None, _tokenize, PROCESSOR, torch.float32, "cpu")
        try:
            agree_on_val_shards(SPEC, "cpu") if case == "intact" else evaluator(engine=None)
            errors[case] = ""
        except Exception as e:  # what each rank would print; then it stops, as a job's rank does
            errors[case] = f"{type(e).__name__}: {e}"
            break
    return errors


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_ranks_with_different_validation_shards_all_stop_with_one_line_naming_it(tmp_path, damage):
    """Rank 1's node-local copy lacks shard 1, or holds it truncated. A missing one raised on rank
    1 alone while rank 0 waited in the zero-shot class broadcast until the group timeout (30
    minutes in a job; 20 s here, so a regression fails rather than hangs); a truncated one split
    the set silently. Now both ranks raise ShardListError, one line naming rank 1 and the shard
    (its sizes when truncated); byte-identical copies pass the check on both ranks."""
    nodes = {case: _node_copies(tmp_path / case, case) for case in ("intact", damage)}
    per_rank = run_distributed(_first_eval_on_node, 2, nodes, timeout_s=20)
    assert [errors["intact"] for errors in per_rank] == ["", ""]
    errors = [e[damage] for e in per_rank]
    for error in errors:
        assert error.startswith("ValShardsError: data.val_shards differ between ranks"), error
        assert "rank 1" in error and "val/00001.tar" in error and "\n" not in error
    assert errors[0] == errors[1]
    assert ("do not exist" if damage == "missing" else "bytes") in errors[0]


def test_a_val_shard_lost_mid_run_stops_training_with_one_line(tmp_path):
    """A val shard removed while the run trains (a node's copy cleaned up, a shared filesystem
    hiccup): the eval's shard check raises on every rank, and train.py says it in one `error:` line,
    exit 2 (it re-raised every error after the first step: a traceback from every rank)."""
    import subprocess
    import time

    from vutrain.data.synthetic import write_synthetic

    import train_runner

    shards = write_synthetic(str(tmp_path / "data"), 64, 16, image_size=16, val_samples=16, seed=0)
    run_dir = str(tmp_path / "run")
    overrides = train_runner.base_overrides(
        shards,
        run_dir,
        80,
        eval__every=40,
        train__log_every=1,
        data__num_workers=0,
        train__micro_batch_size=4,
    )
    proc = subprocess.Popen(
        train_runner.command("python", overrides), env=train_runner.env(), cwd=train_runner.REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not train_runner.losses(run_dir):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.05)
        val_shard = sorted((tmp_path / "data" / "val").glob("*.tar"))[-1]
        os.remove(val_shard)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and val_shard.name in errors[0], stderr
    assert 0 < max(train_runner.losses(run_dir)) <= 40  # it trained until the eval at step 40 stopped it
