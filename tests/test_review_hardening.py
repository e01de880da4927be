"""Review hardening: a damaged run tokenizer, NGPUS with a leading zero, metrics.jsonl lines that
are not rows, labels on another device than the features (real files, real bash, real losses)."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
import torch

from vutrain.config import ConfigError, build_config
from vutrain.data.synthetic import write_synthetic
from vutrain.losses import ClipLoss, SigLipLoss
from vutrain.losses import positives as positives_module
from vutrain.metrics import logged_eval, read_metrics
from vutrain.model import tokenizer_and_processor
from vutrain.plots import plot_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "vutrain", "configs", "tiny.yaml")
TEXT = ["a red circle on a blue square"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return write_synthetic(str(out), num_samples=16, shard_size=8, image_size=16, val_samples=0)[
        "train_shards"
    ]


def _run_tokenizer(run_dir: str, shards: str):
    cfg = build_config(TINY, []).model
    tokenizer, _, _ = tokenizer_and_processor(cfg, run_dir, shards, "{title}", 100, True, lambda: None)
    return tokenizer


def _truncate_tokenizer(run_dir: str) -> bytes:
    """Half of RUN/tokenizer/tokenizer.json, as an older version killed mid-save left it."""
    path = os.path.join(run_dir, "tokenizer", "tokenizer.json")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    return data[: len(data) // 2]


def test_truncated_run_tokenizer_without_checkpoints_is_retrained(tmp_path, shards, caplog):
    """A truncated RUN/tokenizer/tokenizer.json and no checkpoint: the start retrains it (same
    shards, same token ids) with one warning, instead of a JSONDecodeError on every start."""
    run_dir = str(tmp_path / "run")
    ids = _run_tokenizer(run_dir, shards)(TEXT)["input_ids"]
    _truncate_tokenizer(run_dir)
    with caplog.at_level(logging.WARNING, logger="vutrain.model"):
        retrained = _run_tokenizer(run_dir, shards)
    assert retrained(TEXT)["input_ids"] == ids
    assert [r.message for r in caplog.records if "training it again" in r.message], caplog.text


def test_truncated_run_tokenizer_under_a_checkpoint_is_refused(tmp_path, shards):
    """The same damage with a checkpoint in RUN/checkpoints: retraining could change the token ids
    under the checkpoint's embeddings without a word, so the start refuses in one line that says
    what to do, and leaves the file as it was."""
    run_dir = str(tmp_path / "run")
    _run_tokenizer(run_dir, shards)
    os.makedirs(os.path.join(run_dir, "checkpoints", "step_00000004"))
    torn = _truncate_tokenizer(run_dir)
    with pytest.raises(ConfigError) as info:
        _run_tokenizer(run_dir, shards)
    message = str(info.value)
    assert "\n" not in message and "train.resume=never" in message and "step_00000004" in message
    assert open(os.path.join(run_dir, "tokenizer", "tokenizer.json"), "rb").read() == torn


def test_missing_run_tokenizer_under_a_checkpoint_is_refused(tmp_path, shards):
    """RUN/tokenizer deleted (or lost in a copy) while RUN/checkpoints holds a checkpoint: the start
    trained a new tokenizer without a word, whose token ids the checkpoint's embeddings never saw."""
    import shutil

    run_dir = str(tmp_path / "run")
    _run_tokenizer(run_dir, shards)
    os.makedirs(os.path.join(run_dir, "checkpoints", "step_00000004"))
    shutil.rmtree(os.path.join(run_dir, "tokenizer"))
    with pytest.raises(ConfigError) as info:
        _run_tokenizer(run_dir, shards)
    message = str(info.value)
    assert "\n" not in message and "tokenizer.json is missing" in message and "step_00000004" in message
    assert not os.path.exists(os.path.join(run_dir, "tokenizer"))


def _launcher_argv(tmp_path, **env: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """launch/local.sh with a PYTHON that records its arguments: the launcher's command line."""
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("GPU machine: 8 ranks may exceed the visible GPUs and fail with another message")
    record, fake = tmp_path / "argv", tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "HOSTFILE", "WORLD_SIZE")}
    full_env.update(PYTHON=str(fake), MASTER_PORT="29999", **env)
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local.sh"), "--config", "vutrain/configs/tiny.yaml"],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    return (record.read_text().splitlines() if record.exists() else []), proc


@pytest.mark.parametrize("hostfile", [False, True], ids=["ngpus", "hostfile-slots"])
def test_local_sh_reads_a_leading_zero_as_decimal(tmp_path, hostfile):
    """NGPUS=08 (or a hostfile's slots=08) is 8 ranks: bash arithmetic read it as octal and
    printed "value too great for base" before the refusal."""
    env = {"NGPUS": "08", "WORLD_SIZE": "8"}
    if hostfile:
        (tmp_path / "hostfile").write_text("localhost slots=08\n")
        env = {"HOSTFILE": str(tmp_path / "hostfile"), "WORLD_SIZE": "8"}
    argv, proc = _launcher_argv(tmp_path, **env)
    assert proc.returncode == 0 and "value too great" not in proc.stderr, proc.stderr
    assert "8 CPU rank(s)" in proc.stderr or hostfile, proc.stderr
    assert "deepspeed.launcher.runner" in argv, argv
    if not hostfile:
        assert argv[argv.index("--num_gpus") + 1] == "8", argv


def test_local_sh_zero_ngpus_with_leading_zeros_is_refused_cleanly(tmp_path):
    _, proc = _launcher_argv(tmp_path, NGPUS="00")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "[vutrain-launch] ERROR: NGPUS must be a positive integer, got '00'."
    ]


NOT_ROWS = [
    "5",
    "null",
    "[1, 2]",
    '"text"',
    '{"no_step": 1}',
    '{"step": null}',
    '{"step": 1e999}',
    '{"step": 4, "eval/i2t_r1": 0.5',
]


def test_metrics_lines_that_are_not_rows_are_skipped_and_counted(tmp_path, caplog):
    """metrics.jsonl lines that are JSON but not a row with a step (a hand-edited file), or torn:
    read_metrics, logged_eval and plot_run skip them and say how many (they raised TypeError)."""
    rows = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}, {"step": 2, "eval/i2t_r1": 0.25}]
    lines = [json.dumps(rows[0]), *NOT_ROWS[:4], json.dumps(rows[1]), *NOT_ROWS[4:-1], json.dumps(rows[2])]
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines, NOT_ROWS[-1]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="vutrain.metrics"):
        assert read_metrics(str(tmp_path)) == rows
    assert f"{len(NOT_ROWS)} line(s) skipped" in caplog.text, caplog.text
    assert logged_eval(str(tmp_path), 2) == {"eval/i2t_r1": 0.25}
    pytest.importorskip("matplotlib")
    assert plot_run(str(tmp_path)) == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def _record_mask_devices(monkeypatch) -> list[torch.device]:
    """The device of every positive mask the losses build (the real positive_mask, observed)."""
    devices = []
    real = positives_module.positive_mask

    def observed(*args, **kwargs):
        mask = real(*args, **kwargs)
        devices.append(mask.device)
        return mask

    for module in ("vutrain.losses.clip", "vutrain.losses.siglip"):
        monkeypatch.setattr(f"{module}.positive_mask", observed)
    return devices


@pytest.mark.parametrize("loss_name", ["clip", "siglip", "siglip-bidir"])
def test_loss_moves_labels_to_the_features_device(monkeypatch, loss_name):
    """Features on one device and labels on the CPU (a direct caller; the trainer moves them): the
    positive mask is built on the features' device and the loss runs, instead of a device-mismatch
    error inside cross_entropy. "meta" stands in for CUDA on a machine without a GPU."""
    devices = _record_mask_devices(monkeypatch)
    feats = torch.randn(4, 8, device="meta")
    scale, bias = torch.tensor(10.0, device="meta"), torch.tensor(-10.0, device="meta")
    labels = torch.tensor([0, 1, 0, 2])
    if loss_name == "clip":
        loss = ClipLoss()(feats, feats, scale, labels=labels)
    else:
        loss = SigLipLoss(bidir=loss_name == "siglip-bidir")(feats, feats, scale, bias, labels=labels)
    assert loss.device.type == "meta" and loss.dim() == 0
    assert devices and all(d.type == "meta" for d in devices), devices
