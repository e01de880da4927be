"""train.py's command line read as `python -m vutrain.config` reads it; user ds_config sections train.*
decides; values shown as JSON writes them; a negative shuffle buffer and a mapping for a list key."""

import json

import pytest

from vutrain import config
from vutrain.config import ConfigError, build_config, validate
from vutrain.ds_config import build_ds_config
from vutrain.train import parse_args

SHARDS = "data.train_shards=/data/{00000..00003}.tar"


def _validate(overrides: list[str]) -> None:
    validate(build_config(None, [SHARDS, *overrides]), cuda_available=False)


def _ds_json(tmp_path, ds: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize(
    "args",
    [
        ["seed=1", "--config", "{f}", "train.max_steps=7"],
        ["--config", "{f}", "seed=1", "--config={f}", "train.max_steps=7"],
        ["seed=1", "--conf={f}", "train.max_steps=7", "output_dir=runs/x"],
        ["--config", "{f}", "seed=1", "train.max_steps=7"],
    ],
)
def test_overrides_after_an_option_are_read_like_the_config_module(tmp_path, capsys, args):
    """Overrides before and after `--config` all reach train.py, as `python -m vutrain.config`
    (the launch scripts' view) reads them: argparse took the positionals once and exited with
    "unrecognized arguments: train.max_steps=7"."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text("output_dir: runs/from_file\n")
    argv = [arg.format(f=run_file) for arg in args]
    parsed = parse_args(argv)
    assert (parsed.config, parsed.overrides) == config._take_config_path(argv)
    config.main(["--get", "train.max_steps", *argv])
    assert capsys.readouterr().out.strip() == "7"
    assert build_config(parsed.config, parsed.overrides).train.max_steps == 7


def test_overrides_after_the_launchers_local_rank_are_kept():
    """The deepspeed launcher appends --local_rank=N; overrides after it were refused."""
    parsed = parse_args(["--config", "tiny", "seed=1", "--local_rank=3", "train.max_steps=7"])
    assert (parsed.config, parsed.local_rank, parsed.overrides) == (
        "tiny",
        3,
        ["seed=1", "train.max_steps=7"],
    )


@pytest.mark.parametrize(
    "ds, words",
    [
        ({"amp": {"enabled": True, "opt_level": "O1"}}, 'has an "amp" section, but Apex AMP'),
        ({"elasticity": {"enabled": True, "max_train_batch_size": 64}}, 'has an "elasticity" section'),
    ],
)
def test_amp_and_elasticity_sections_are_config_errors(tmp_path, capsys, ds, words):
    """Apex AMP would autocast a train.precision=fp32 run, elasticity pick its own batch size:
    refused with what to set instead, before any process group (`python -m vutrain.config` passed
    them; DeepSpeed refused them only when the engine was built)."""
    path = _ds_json(tmp_path, ds)
    with pytest.raises(ConfigError, match=words):
        _validate([f"train.ds_config={path}"])
    with pytest.raises(SystemExit) as exit_:
        config.main([SHARDS, f"train.ds_config={path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error:") and "\n" not in err and "train." in err


def test_string_values_in_a_ds_config_are_shown_as_strings(tmp_path):
    """A JSON string "2" beside train.zero_stage=2 read "sets zero_optimization.stage=2 but
    train.zero_stage=2"; the values are shown as JSON writes them."""
    cfg = build_config(None, [SHARDS, "train.zero_stage=2"])
    cfg.train.ds_config = _ds_json(tmp_path, {"zero_optimization": {"stage": "2"}})
    with pytest.raises(ConfigError, match='zero_optimization.stage="2" but train.zero_stage=2'):
        build_ds_config(cfg.train, 1)
    cfg.train.ds_config = _ds_json(tmp_path, {"train_batch_size": "8"})
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 8, 1
    with pytest.raises(ConfigError, match='train_batch_size="8" but the run config gives 8'):
        build_ds_config(cfg.train, 1)
    path = _ds_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "0.001"}}})
    with pytest.raises(ConfigError, match='optimizer.params.lr="0.001" but train.lr gives 0.001'):
        _validate(["train.lr=0.001", f"train.ds_config={path}"])


def test_negative_shuffle_buffer_is_a_config_error():
    """data.shuffle_buffer=-1 trained unshuffled without a word."""
    with pytest.raises(ConfigError, match="data.shuffle_buffer must be >= 0, got -1"):
        _validate(["data.shuffle_buffer=-1"])
    _validate(["data.shuffle_buffer=0"])


@pytest.mark.parametrize(
    "yaml_text, words",
    [
        ("model:\n  lora:\n    target_modules: {a: 1}\n", "must be a list, got the mapping"),
        ("eval:\n  templates: [{title}, 'a {}']\n", "is a YAML mapping, not text; quote it"),
        ("model:\n  lora:\n    target_modules: [[q_proj, v_proj]]\n", "is a YAML list, not text"),
    ],
)
def test_mapping_for_a_list_key_is_a_config_error(tmp_path, yaml_text, words):
    """A mapping (or nested list) became one entry of its str(), e.g. "{'a': 1}"."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=words):
        build_config(str(run_file))


def test_list_entries_as_typed_still_read():
    cfg = build_config(
        None, ["eval.templates=[a photo of {}., {}]", "model.lora.target_modules=q_proj,k_proj"]
    )
    assert cfg.eval.templates == ["a photo of {}.", "{}"]
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"]
