"""Start-up faults (issue 11): shard lists checked before training, shipped configs that match
the demo, and one clear line (printed once, by rank 0) instead of every rank's traceback."""

from __future__ import annotations

import json
import logging
import math
import os

import braceexpand
import pytest

from vutrain import demo, train
from vutrain.config import load_config
from vutrain.data.shards import ShardListError

import train_runner as tr


def _overrides(synthetic_shards, spec: str, *extra: str) -> list[str]:
    return [f"data.train_shards={spec}", f"data.val_shards={synthetic_shards['val_shards']}", *extra]


def test_brace_range_naming_missing_shards_is_refused(synthetic_shards):
    train_dir = os.path.dirname(synthetic_shards["train_shards"])  # 00000..00007 exist
    spec = f"{train_dir}/{{00000..00020}}.tar"
    cfg = load_config(tr.TINY, _overrides(synthetic_shards, spec))
    with pytest.raises(ShardListError) as err:
        train.check_shard_lists(cfg, log_warnings=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.train_shards: 13 of 21 shards do not exist: ")
    assert f"{train_dir}/00008.tar" in message and "and 8 more" in message
    assert "data.allow_missing_shards=true" in message


def test_allow_missing_shards_warns_with_the_count(synthetic_shards, caplog):
    train_dir = os.path.dirname(synthetic_shards["train_shards"])
    cfg = load_config(
        tr.TINY,
        _overrides(synthetic_shards, f"{train_dir}/{{00000..00009}}.tar", "data.allow_missing_shards=true"),
    )
    with caplog.at_level(logging.WARNING):
        train.check_shard_lists(cfg, log_warnings=True)
    assert "2 of 10 shards do not exist" in caplog.text
    assert cfg.data.train_shards.split("::") == [f"{train_dir}/{i:05d}.tar" for i in range(8)]


def test_tiny_config_names_what_the_demo_writes():
    """`make demo` (vutrain/demo.py defaults) writes ceil(N / shard) training shards and one
    validation shard; tiny.yaml must name exactly those, no more."""
    parser_defaults = _demo_defaults()
    cfg = load_config(tr.TINY)
    n_train = math.ceil(parser_defaults["num_samples"] / parser_defaults["shard_size"])
    n_val = math.ceil(parser_defaults["val_samples"] / parser_defaults["shard_size"])
    assert list(braceexpand.braceexpand(cfg.data.train_shards)) == [
        f"demo_out/data/train/{i:05d}.tar" for i in range(n_train)
    ]
    assert list(braceexpand.braceexpand(cfg.data.val_shards)) == [
        f"demo_out/data/val/{i:05d}.tar" for i in range(n_val)
    ]


def _demo_defaults() -> dict:
    """The demo's argparse defaults (parsed from its source so no training starts)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(demo.main))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            name = node.args[0].value.lstrip("-").replace("-", "_")
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    found[name] = kw.value.value
    return found


@pytest.mark.slow
def test_missing_shard_under_deepspeed_is_one_line_from_rank_0(synthetic_shards, tmp_path):
    """Two ranks through the deepspeed launcher, a brace range past the last shard: exit 2 before
    any process group, the message once, no traceback. Rank 0 starts 2 s late (a loaded machine):
    rank 1, which leaves the message to rank 0, exited at once, the launcher killed rank 0 before
    it printed, and the job ended with no message (seen in CI)."""
    train_dir = os.path.dirname(synthetic_shards["train_shards"])
    over = tr.base_overrides(
        dict(synthetic_shards, train_shards=f"{train_dir}/{{00000..00009}}.tar"), str(tmp_path / "run"), 2
    )
    slow_rank0 = tmp_path / "slow_rank0"
    slow_rank0.mkdir()
    (slow_rank0 / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('LOCAL_RANK') == '0':\n    time.sleep(2)\n"
    )
    pythonpath = os.pathsep.join([str(slow_rank0), tr.env()["PYTHONPATH"]])
    proc = tr.run("deepspeed", over, timeout=300, extra_env={"PYTHONPATH": pythonpath})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: data.train_shards: 2 of 10 shards do not exist: {train_dir}/00008.tar, "
        f"{train_dir}/00009.tar. Fix the path or brace range, or set "
        "data.allow_missing_shards=true to use the 8 that exist."
    ], out[-3000:]
    assert "Traceback" not in out
    assert not os.path.exists(tmp_path / "run")  # nothing started


def test_unexpected_error_is_one_line_pointing_at_the_traceback(tmp_path, capsys):
    from vutrain import startup_errors

    try:
        {}["model"]
    except KeyError as exc:
        code = startup_errors.report(exc, rank=0, world_size=1, run_dir=str(tmp_path))
    lines = capsys.readouterr().err.splitlines()
    log_path = tmp_path / "logs" / "error_rank0.log"
    assert code != 0
    assert lines == [f"error: KeyError: 'model' (full traceback: {log_path})"]
    assert "Traceback" in log_path.read_text()


@pytest.mark.parametrize(
    "ds_json, extra, message",
    [
        ({"zero_optimization": {"stage": 3}}, [], "sets zero_optimization.stage=3 but train.zero_stage=2"),
        (
            {"gradient_accumulation_steps": 2},
            [],
            "sets gradient_accumulation_steps=2 but the run config gives 1",
        ),
        ({}, ["train.global_batch_size=100"], "train.global_batch_size=100 is not a multiple"),
    ],
)
def test_ds_config_contradiction_fails_before_the_process_group(
    synthetic_shards, tmp_path, capsys, ds_json, extra, message
):
    """A train.ds_config whose ZeRO stage or batch keys contradict train.* (and a global batch the
    world size does not divide) end in one line before anything starts: they were found when the
    engine was built, after the process group, config.yaml and the preset tokenizer's training."""
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds_json))
    run_dir = tmp_path / "run"
    overrides = _overrides(
        synthetic_shards,
        synthetic_shards["train_shards"],
        f"output_dir={run_dir}",
        f"train.ds_config={ds_path}",
        *extra,
    )
    assert train.main(["--config", tr.TINY, *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not run_dir.exists()  # no config.yaml, no tokenizer: nothing started
