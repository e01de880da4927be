"""A user ds_config's optimizer section and where the launch scripts read `--config` from."""

import json

import pytest
import torch

from vutrain import config
from vutrain.config import ConfigError, build_config, validate
from vutrain.train import parse_args


def _validate_with_ds_config(tmp_path, ds: dict, *overrides: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = build_config(
        None, ["data.train_shards=/data/{00000..00003}.tar", f"train.ds_config={path}", *overrides]
    )
    validate(cfg, cuda_available=False)


@pytest.mark.parametrize(
    "optimizer,words",
    [
        ({"params": {"lr": "auto"}}, 'needs a "type"'),
        ({"type": None}, 'needs a "type"'),
        ({"type": "AdamWW"}, 'optimizer type "AdamWW" is neither a DeepSpeed optimizer'),
        ({"type": "AdamW", "params": ["lr", 5e-4]}, 'optimizer "params" must be a JSON object'),
        ({"type": "SGD", "params": "lr=0.1"}, 'optimizer "params" must be a JSON object'),
        ({"type": "AdamW", "params": {"betas": 0.9}}, "optimizer.params.betas=0.9 but train.beta1/2"),
    ],
)
def test_broken_optimizer_section_is_one_config_error(tmp_path, optimizer, words):
    """Each of these passed validate() and then failed as a traceback from every rank: no "type"
    (DeepSpeed builds no optimizer; AssertionError at the first backward), a misspelt type
    (AssertionError in engine start-up), "params" not an object (AttributeError in validate) and
    a number for "betas" (TypeError in validate)."""
    with pytest.raises(ConfigError) as err:
        _validate_with_ds_config(tmp_path, {"optimizer": optimizer})
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["AdamW", "adam", "Lion", "SGD", "Adagrad"])
def test_optimizer_types_deepspeed_builds_still_pass(tmp_path, kind):
    # Adagrad only at ZeRO-0: DeepSpeed's ZeRO rebuilds torch's Adagrad over one parameter group and
    # fails at the first step (refused at ZeRO >= 1: tests/test_review_dsconfig.py).
    stage = ["train.zero_stage=0"] if kind == "Adagrad" else []
    _validate_with_ds_config(tmp_path, {"optimizer": {"type": kind, "params": {}}}, *stage)


def test_engine_refuses_optimizer_without_type(single_process, tmp_path):
    """The engine checks the JSON again: before, DeepSpeed built an engine without an optimizer
    from it (engine.optimizer None), whose first backward failed."""
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.engine import build_engine

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"params": {"lr": 5e-4}}}))
    init_distributed(resolve_dist_env())
    cfg = config.TrainConfig(micro_batch_size=2, zero_stage=0, ds_config=str(path))
    with pytest.raises(ConfigError, match='needs a "type"'):
        build_engine(torch.nn.Linear(4, 4), cfg, 1, torch.device("cpu"))


def _write_run_file(tmp_path, name: str, output_dir: str) -> str:
    path = tmp_path / name
    path.write_text(f"output_dir: {output_dir}\n")
    return str(path)


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "{a}", "seed=1", "--config", "{b}"],
        ["--config={a}", "--config={b}", "seed=1"],
        ["--config", "{a}", "seed=1", "--conf", "{b}"],
        ["--conf={b}", "seed=1"],
    ],
)
def test_get_reads_the_run_file_train_py_reads(tmp_path, capsys, args):
    """`python -m vutrain.config --get` (the launch scripts' view of the run) takes --config as
    train.py's argparse does: the last one, and its abbreviations. It read the first one and took a
    second `--config` for an override, so the launch scripts got no output_dir (requeue without
    train.resume=auto) while train.py trained into the second file's directory."""
    a = _write_run_file(tmp_path, "a.yaml", "runs/a")
    b = _write_run_file(tmp_path, "b.yaml", "runs/b")
    argv = [arg.format(a=a, b=b) for arg in args]
    assert parse_args(argv).config == b
    config.main(["--get", "output_dir", *argv])
    assert capsys.readouterr().out.strip() == "runs/b"


def test_config_without_a_file_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        config.main(["--get", "output_dir", "seed=1", "--config"])
    assert "--config needs a YAML file" in str(exit_.value.code)
