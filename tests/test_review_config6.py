"""`python -m vutrain.config` refuses a user DeepSpeed JSON that train.py's start-up refuses.

The config check ran only check_user_ds_config, while build_ds_config (train.py's world-size check,
before the process group) also refuses a top-level near miss, a misspelt section key, a ZeRO stage
that disagrees with train.zero_stage, an offload the stage ignores, "auto" without a train.* value,
Adagrad under ZeRO and batch keys that disagree: the config tool printed the config and exit 0, then
every rank of the run failed. Run as `python -m`, an error raised by vutrain.ds_config was a
traceback, since that module's ConfigError is not the class of the `__main__` copy of config.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vutrain import config
from vutrain.config import ConfigError, load_config
from vutrain.train import check_world_size

ROOT = Path(__file__).resolve().parents[1]

REFUSED_AT_START_UP = {
    "top-level-near-miss": {"zero_optimisation": {"stage": 3}},
    "misspelt-zero-key": {"zero_optimization": {"stage": 2, "overlap_com": True}},
    "stage-disagrees": {"zero_optimization": {"stage": 3}},
    "offload-param-at-zero2": {"zero_optimization": {"offload_param": {"device": "cpu"}}},
    "auto-without-value": {"optimizer": {"type": "SGD", "params": {"momentum": "auto"}}},
    "adagrad-under-zero": {"optimizer": {"type": "Adagrad", "params": {}}},
    "micro-batch-disagrees": {"train_micro_batch_size_per_gpu": 32},
}


def _overrides(tmp_path, ds: dict, *extra: str) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return [
        f"train.ds_config={path}",
        "train.zero_stage=2",
        "train.micro_batch_size=4",
        "data.train_shards=x.tar",
        "eval.every=0",
        f"output_dir={tmp_path / 'run'}",
        *extra,
    ]


@pytest.mark.parametrize("ds", REFUSED_AT_START_UP.values(), ids=REFUSED_AT_START_UP.keys())
def test_config_check_refuses_what_start_up_refuses(ds, tmp_path, capsys):
    overrides = _overrides(tmp_path, ds)
    with pytest.raises(ConfigError) as at_start_up:
        check_world_size(config.build_config("tiny", overrides), 1)
    with pytest.raises(SystemExit) as exit_info:
        config.main(["--config", "tiny", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"config error: {at_start_up.value}"


def test_batch_keys_for_a_larger_world_still_pass(tmp_path):
    # 4 x 1 x world 8 and, with train.global_batch_size, 4 x 2 x world 4: the world size is not
    # known to the config check, so a JSON written for a multi-rank run must not be refused.
    load_config("tiny", _overrides(tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    both = {"train_batch_size": 32, "gradient_accumulation_steps": 2}
    load_config("tiny", _overrides(tmp_path, both, "train.global_batch_size=32"))
    with pytest.raises(ConfigError, match="train_batch_size=32 but the run config gives 16"):
        load_config("tiny", _overrides(tmp_path, both, "train.global_batch_size=16"))


def test_python_m_prints_one_line_for_a_ds_config_error(tmp_path):
    overrides = _overrides(tmp_path, REFUSED_AT_START_UP["misspelt-zero-key"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "vutrain.config", "--config", "tiny", *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "WARNING" not in line]  # DeepSpeed's accelerator
    assert lines == [
        f"config error: {tmp_path / 'ds.json'}: zero_optimization.overlap_com is not a DeepSpeed "
        'zero_optimization key: did you mean "overlap_comm"?'
    ]


def test_text_key_merged_by_a_yaml_merge_key_keeps_its_text(tmp_path):
    # Written directly, `output_dir: 2024.10` stays "2024.10"; through a merge key it became the
    # float 2024.1 and so the run directory "2024.1" (another run's).
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "train:\n  <<: &shared {compile_backend: 2024.10, max_steps: 5}\n  lr: 0.5\n"
        "model:\n  <<: [{hidden_act: off}]\n"
    )
    cfg = config.build_config(str(run_file))
    assert (cfg.train.compile_backend, cfg.train.max_steps, cfg.train.lr) == ("2024.10", 5, 0.5)
    assert cfg.model.hidden_act == "off"
