"""Second review of the engine, optimizer and gradient path: train.global_batch_size against an
explicit train.grad_accum_steps (tests/test_review_optim.py holds the first review's tests)."""

from __future__ import annotations

import pytest

from vutrain import train
from vutrain.config import ConfigError, load_config
from vutrain.global_batch import with_global_batch

import train_runner as tr


def test_global_batch_refuses_another_explicit_accumulation(tiny_shards, tmp_path, capsys, single_process):
    """global_batch_size=16 with micro 4 on 1 rank gives accumulation 4: an explicit
    grad_accum_steps=2 was replaced by it silently (another accumulation than the user asked)."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train_shards={tiny_shards['train_shards']}",
        f"data.val_shards={tiny_shards['val_shards']}",
        f"output_dir={run_dir}",
        "train.micro_batch_size=4",
        "train.global_batch_size=16",
        "train.grad_accum_steps=2",
    ]
    assert train.main(["--config", tr.TINY, *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, err
    assert "train.grad_accum_steps=2 conflicts with train.global_batch_size=16" in errors[0]
    assert "gives 4 on 1 ranks" in errors[0]
    assert "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("given, world, derived", [(1, 2, 4), (4, 2, 4), (1, 8, 1)])
def test_global_batch_keeps_deriving_where_nothing_conflicts(given, world, derived):
    """The default 1 (or the same value) still yields to the derived accumulation."""
    cfg = load_config(
        None,
        [
            "data.train_shards=x.tar",
            "train.micro_batch_size=4",
            "train.global_batch_size=32",
            f"train.grad_accum_steps={given}",
        ],
    )
    assert with_global_batch(cfg, world).train.grad_accum_steps == derived


def test_global_batch_conflict_is_a_config_error_at_any_world():
    cfg = load_config(
        None,
        [
            "data.train_shards=x.tar",
            "train.micro_batch_size=4",
            "train.global_batch_size=32",
            "train.grad_accum_steps=4",
        ],
    )
    assert with_global_batch(cfg, 2).train.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="gives 8 on 1 ranks"):
        with_global_batch(cfg, 1)


def test_saved_config_reruns_on_another_world(tiny_shards, tmp_path, single_process):
    """The run's config.yaml held the accumulation derived for its world (4 on 1 rank): reused as
    `--config` on 2 ranks (a requeue on fewer nodes) it conflicted with the derivation there."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train_shards={tiny_shards['train_shards']}",
        f"output_dir={run_dir}",
        "train.micro_batch_size=4",
        "train.global_batch_size=16",
        "data.val_shards=",
        "eval.every=0",
        "train.max_steps=1",
        "train.warmup_steps=0",
    ]
    assert train.main(["--config", tr.TINY, *overrides]) == 0
    saved = load_config(str(run_dir / "config.yaml"))
    assert saved.train.global_batch_size == 16
    assert with_global_batch(saved, 2).train.grad_accum_steps == 2
