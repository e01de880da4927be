"""Review 12 of the run configuration: one key given twice on the command line, case-only typos,
and top-level YAML anchor holders in a run file.

The shell expands an unquoted `data.train_shards=d/{00000..00002}.tar` into one override per shard,
of which the last won: the run trained on one shard without a word (and `{q,v}_proj` adapted
v_proj alone). Now a shard spec or list key given different values is refused, and any other key
given different values is a one-line warning naming the first and the last. `Train.LR=...` got no
"did you mean" (difflib's ratio is case-sensitive), and `_defaults: &d {...}` / `x-common: &c`,
the usual holders of an anchor that sections merge with `<<: *d`, were refused as unknown keys.

Runtime: ~5 s on 2 busy cores (two `python -m vutrain.config` runs).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from vutrain.config import ConfigError, build_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_words(text: str) -> list[str]:
    """The arguments bash makes of `text` typed unquoted (brace expansion included)."""
    proc = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout.split("\0")[:-1]


def _run_file(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ one key given several times


@pytest.mark.parametrize(
    "typed, key, how",
    [
        ("data.train_shards=d/{00000..00002}.tar", "data.train_shards", "join several sources with '::'"),
        ("data.val_shards=v/{a,b}.tar", "data.val_shards", "quote a brace range"),
        ("model.lora.target_modules={q,v}_proj", "model.lora.target_modules", "comma-separated"),
    ],
)
def test_an_unquoted_brace_the_shell_expanded_is_refused(typed, key, how):
    """Criterion: the shell's one-override-per-value expansion of a shard spec or list key is a
    ConfigError naming the key, the count and what to write; it trained on the last value."""
    words = _bash_words(typed)
    assert len(words) > 1, words  # the shell did expand it
    with pytest.raises(ConfigError) as caught:
        build_config(None, ["seed=1", *words])
    message = str(caught.value)
    assert message.startswith(f"{key} is given {len(words)} times among the overrides"), message
    assert repr(words[0]) in message and repr(words[-1]) in message and how in message, message


def test_the_expanded_shard_spec_is_one_error_line_from_python_m_vutrain_config():
    """End to end as the launch scripts and a user check a command line: exit 2, one line."""
    words = _bash_words("data.train_shards=d/{00000..00002}.tar")
    proc = subprocess.run(
        [sys.executable, "-m", "vutrain.config", "--config", "tiny", *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: data.train_shards is given 3 times"), lines


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "vutrain.config" and r.levelno == logging.WARNING
    ]


def test_a_scalar_key_given_two_values_warns_naming_both(caplog, monkeypatch):
    """Criterion: a line pasted twice with another train.lr warns in one line naming both
    overrides and that the last is used (scripts layer overrides on purpose, so no error)."""
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING, logger="vutrain.config"):
        cfg = build_config(None, ["train.lr=1.5e-3", "train.max_steps=7", "train.lr=2.5e-4"])
    assert cfg.train.lr == 2.5e-4
    got = _warnings(caplog)
    assert len(got) == 1, got
    assert got[0].startswith("train.lr is given 2 times among the overrides with different values"), got
    assert "'train.lr=1.5e-3' first" in got[0] and "the last, 'train.lr=2.5e-4', is used" in got[0], got


def test_only_rank_0_warns(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.WARNING, logger="vutrain.config"):
        assert build_config(None, ["train.lr=3.5e-3", "train.lr=4.5e-4"]).train.lr == 4.5e-4
    assert _warnings(caplog) == []


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.lr=1e-3", "train.lr=0.001"],  # one value, two spellings
        ["data.train_shards=d/0.tar", "data.train_shards=d/0.tar"],
        ["model.lora.target_modules=q_proj,v_proj", "model.lora.target_modules=[q_proj, v_proj]"],
    ],
)
def test_the_same_value_twice_is_neither_an_error_nor_a_warning(caplog, monkeypatch, overrides):
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING, logger="vutrain.config"):
        build_config(None, overrides)
    assert _warnings(caplog) == []


def test_layered_overrides_still_apply_the_last(monkeypatch):
    """A requeue appends train.resume=auto after the submitted train.resume=never (launch/common.sh),
    and the demo's `data.val_shards=` clears its own spec: both keep working, with a warning."""
    monkeypatch.setenv("RANK", "0")
    cfg = build_config(
        None, ["train.resume=never", "data.val_shards=v/0.tar", "data.val_shards=", "train.resume=auto"]
    )
    assert cfg.train.resume == "auto" and cfg.data.val_shards == ""


# ------------------------------------------------------------------ case-only typos


@pytest.mark.parametrize(
    "override, suggested",
    [
        ("Train.LR=1e-3", "train.lr"),
        ("train.LR=1e-3", "train.lr"),
        ("train.EPS=1e-8", "train.eps"),
        ("TRAIN.MAX_STEPS=3", "train.max_steps"),
        ("Model.Lora.R=8", "model.lora.r"),
    ],
)
def test_a_case_only_typo_suggests_the_key(override, suggested):
    """Criterion: `Train.LR=...` says "did you mean train.lr?" (it said nothing)."""
    with pytest.raises(ConfigError, match=rf"\(did you mean {suggested}\?\)"):
        build_config(None, [override])


def test_a_case_only_typo_in_a_run_file_suggests_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\(did you mean train\.lr\?\)"):
        build_config(_run_file(tmp_path, "train:\n  LR: 0.1\n"))


# ------------------------------------------------------------------ YAML anchor holders


@pytest.mark.parametrize("holder", ["_defaults", "x-common"])
def test_a_top_level_anchor_holder_is_ignored_and_its_merge_is_read(tmp_path, holder):
    """Criterion: `_defaults: &d {...}` or docker compose's `x-common: &d {...}`, merged into a
    section with `<<: *d`, loads: the section gets the merged keys (a text key as text), the
    holder itself is no key of the config. It was "unknown config key"."""
    text = (
        f"{holder}: &d\n  max_steps: 3\n  lr: 1e-3\n  compile_backend: 2024.10\n"
        "train:\n  <<: *d\n  zero_stage: 1\n"
    )
    cfg = build_config(_run_file(tmp_path, text))
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.zero_stage) == (3, 1e-3, 1)
    assert cfg.train.compile_backend == "2024.10"
    assert holder not in to_dict(cfg)


def test_a_key_merged_from_an_anchor_holder_is_still_checked(tmp_path):
    text = "_defaults: &d {max_steps: 3, every: 4}\ntrain:\n  <<: *d\n"
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.every' \(did you mean eval\.every\?\)"
    ):
        build_config(_run_file(tmp_path, text))


def test_an_anchor_holder_is_a_run_file_form_only():
    """On the command line `_defaults.x=1` still names no key."""
    with pytest.raises(ConfigError, match="unknown config key '_defaults'"):
        build_config(None, ["_defaults.max_steps=1"])
