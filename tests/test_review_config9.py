"""Review 9 of the run configuration: integers written as floats beyond 2**53, YAML 1.1's boolean
keys (`no:`), numbers too large for a float, and `python -m vutrain.config`'s own usage errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vutrain.config import ConfigError, build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = "1" + "0" * 400  # beyond a float's 1.8e308


def _run_file(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _config_cli(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "vutrain.config", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.mark.parametrize("written", ["100000000000000001.0", "1.00000000000000001e17", "1e300"])
def test_integer_written_as_a_float_beyond_2_53_is_refused(tmp_path, written):
    """seed=100000000000000001.0 trained with seed 100000000000000000: a float holds ~16 digits."""
    for where, args in (
        ("override", (None, [f"seed={written}"])),
        ("quoted override", (None, [f"seed='{written}'"])),
        ("run file", (_run_file(tmp_path, f"seed: {written}\n"), [])),
    ):
        with pytest.raises(ConfigError, match=r"^seed must be an integer, got .*2\*\*53") as err:
            build_config(*args)
        assert "\n" not in str(err.value), where


def test_integers_that_a_float_holds_exactly_still_pass(tmp_path):
    assert build_config(None, ["seed=100000000000000001"]).seed == 100000000000000001
    assert build_config(_run_file(tmp_path, "seed: 100000000000000001\n")).seed == 100000000000000001
    assert build_config(None, ["seed=1e15", "train.max_steps=5.0"]).seed == 10**15
    assert build_config(None, ["seed=9007199254740991.0"]).seed == 2**53 - 1


@pytest.mark.parametrize("key, section", [("no", ""), ("yes", "train"), ("off", "eval"), ("~", "model")])
def test_run_file_key_is_named_as_written(tmp_path, key, section):
    """YAML 1.1 reads `no:` as False: the error named 'False' (or 'train.True'), no key of the file."""
    text = f"{key}: 1\n" if not section else f"{section}:\n  {key}: 1\n"
    with pytest.raises(ConfigError) as err:
        build_config(_run_file(tmp_path, text))
    named = f"{section}.{key}" if section else key
    assert str(err.value).startswith(f"unknown config key {named!r}"), err.value


def test_boolean_looking_values_and_merge_keys_keep_working(tmp_path):
    path = _run_file(tmp_path, "base: &b {max_steps: 3}\ntrain: {compile: no, progress_bar: yes}\n")
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        build_config(path)
    path = _run_file(tmp_path, "train: &t {max_steps: 3, compile: no}\neval:\n  <<: {every: 4}\n")
    cfg = build_config(path)
    assert (cfg.train.max_steps, cfg.train.compile, cfg.eval.every) == (3, False, 4)


def test_float_key_given_an_integer_too_large_for_a_float(tmp_path):
    """train.lr=1000...0 (309+ digits) was an OverflowError traceback."""
    for args in ((None, [f"train.lr={HUGE}"]), (_run_file(tmp_path, f"train:\n  lr: {HUGE}\n"), [])):
        with pytest.raises(ConfigError, match=r"^train.lr must be a finite number"):
            build_config(*args)


@pytest.mark.slow  # runs python -m vutrain.config
@pytest.mark.parametrize(
    "args, line",
    [
        (["--config"], "config error: --config needs a YAML file"),
        (["--get", "seed", "seed=1", "--config"], "config error: --config needs a YAML file"),
        (["--get", "seed", "--local_rank"], "config error: --local_rank needs a number"),
        (["--get"], "config error: --get needs a key, e.g. output_dir or train.resume"),
        # train.py refuses these ("invalid int value"); here seed=5 was dropped as the rank.
        (
            ["--get", "seed", "--local_rank", "seed=5"],
            "config error: --local_rank needs a number, got 'seed=5'",
        ),
        (["--get", "seed", "--local_rank=x"], "config error: --local_rank needs a number, got 'x'"),
    ],
)
def test_config_module_usage_errors_exit_2_with_one_line(tmp_path, args, line):
    """They exited 1 (Python's exit for a SystemExit message); every other bad input exits 2."""
    got = _config_cli(args, str(tmp_path))
    assert (got.returncode, got.stderr.strip().splitlines(), got.stdout) == (2, [line], "")


@pytest.mark.slow  # runs python -m vutrain.config
def test_config_module_still_reads_the_launchers_local_rank(tmp_path):
    for local_rank in (["--local_rank", "0"], ["--local_rank=1"], ["--local-rank", "-1"]):
        got = _config_cli(["--get", "seed", *local_rank, "seed=5"], str(tmp_path))
        assert (got.returncode, got.stdout.strip()) == (0, "5"), got.stderr
