"""Review 8 of the run configuration: `~` in path keys, and `--local_rank` in `python -m vutrain.config`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vutrain.config import ConfigError, build_config, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_cli(args: list[str], home: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": home, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "vutrain.config", *args], capture_output=True, text=True, env=env, cwd=home
    )


def test_tilde_in_path_keys_is_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "ckpt").mkdir(parents=True)
    (home / "ds.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    run_file = tmp_path / "run.yaml"
    run_file.write_text("output_dir: ~/runs/from_file\ntrain:\n  resume: ~/ckpt\n  ds_config: ~/ds.json\n")
    shards = "~/a/{00000..00001}.tar::~/b/00000.tar::http://[::1]:8000/~x/{0..1}.tar::/data/~/c.tar"
    assert build_config(None, ["output_dir=~/runs/cli"]).output_dir == f"{home}/runs/cli"
    cfg = load_config(str(run_file), [f"data.train_shards={shards}", "data.val_shards=~/v.tar"])
    assert cfg.output_dir == f"{home}/runs/from_file"  # not ./~/runs/from_file
    assert cfg.train.resume == f"{home}/ckpt"
    assert cfg.train.ds_config == f"{home}/ds.json"
    # Each source's leading ~ only: a URL's IPv6 host and a ~ inside a path stay as written.
    assert cfg.data.train_shards == (
        f"{home}/a/{{00000..00001}}.tar::{home}/b/00000.tar::http://[::1]:8000/~x/{{0..1}}.tar::/data/~/c.tar"
    )
    assert cfg.data.val_shards == f"{home}/v.tar"
    # The recorded config.yaml names the same folder when given back as --config from elsewhere.
    save_config(cfg, str(tmp_path / "config.yaml"))
    monkeypatch.chdir(home)
    assert build_config(str(tmp_path / "config.yaml")) == cfg
    # ~ alone is YAML's null on the command line, as the README says: still no value.
    with pytest.raises(ConfigError, match="output_dir is empty"):
        load_config(str(run_file), ["output_dir=~", "data.train_shards=x.tar"])


def test_get_reads_tilde_as_the_trainer_does_and_config_path_too(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "run.yaml").write_text("output_dir: ~/runs/a\n")
    # `--config=~/run.yaml`: the shell expands no ~ after '=' in an option's word.
    got = _config_cli(["--get", "output_dir", "--config=~/run.yaml"], str(home))
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"{home}/runs/a"


def test_config_module_accepts_the_launchers_local_rank(tmp_path):
    (tmp_path / "run.yaml").write_text("seed: 3\n")
    for local_rank in (["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=0"]):
        got = _config_cli(["--get", "seed", "--config", "run.yaml", *local_rank, "seed=5"], str(tmp_path))
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == "5"
    missing = _config_cli(["--get", "seed", "--config", "run.yaml", "--local_rank"], str(tmp_path))
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == ["config error: --local_rank needs a number"]
