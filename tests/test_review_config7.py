"""Review round 7 of the run config: run files and overrides that named something odd were a
traceback, a misleading error or, for an empty `--config`, a silent run of the defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vutrain.config import ConfigError, RunConfig, build_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_file(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "text",
    [
        "eval:\n  templates: &t ['a {}', *t]\n",  # a list that holds itself
        "eval: &e\n  templates: *e\n",  # a section whose key holds the section
        "train: &t\n  max_steps: 3\n  <<: *t\n",  # a merge key of its own mapping
    ],
)
def test_alias_inside_its_own_anchor_is_one_config_error(tmp_path, text):
    """Criterion: a run file whose alias refers to its own anchor raises ConfigError naming the
    file and 'own anchor' (it was a RecursionError traceback from the duplicate-key check)."""
    path = _run_file(tmp_path, text)
    with pytest.raises(ConfigError, match="own anchor") as info:
        build_config(path)
    assert path in str(info.value)


def test_shared_anchor_that_is_not_recursive_still_loads(tmp_path):
    """Criterion: an anchor used twice (not inside itself) loads as before: both keys get its value."""
    path = _run_file(tmp_path, "output_dir: &o runs/a\ndata:\n  train_shards: *o\n")
    cfg = build_config(path)
    assert cfg.output_dir == "runs/a" and cfg.data.train_shards == "runs/a"


@pytest.mark.parametrize(
    ("text", "head", "tail"),
    [("train.max_steps: 5\n", "train", "max_steps"), ("model:\n  lora.r: 4\n", "lora", "r")],
)
def test_dotted_key_in_a_run_file_says_to_nest_it(tmp_path, text, head, tail):
    """Criterion: a run file's dotted key that names a field is refused with how to nest it, not
    'did you mean' the very key that was written."""
    with pytest.raises(ConfigError) as info:
        build_config(_run_file(tmp_path, text))
    message = str(info.value)
    assert "did you mean" not in message
    assert f"'{head}:'" in message and f"'{tail}: ...'" in message


def test_override_of_a_key_below_a_key_names_the_key():
    """Criterion: `train.lr.x=1` says train.lr is a key, not a section; it said 'train.lr must be
    a number, got {'x': 1}', a mapping the user never typed."""
    for item, leaf in (("train.lr.x=1", "train.lr"), ("output_dir.sub=runs/a", "output_dir")):
        with pytest.raises(ConfigError) as info:
            build_config(None, [item])
        assert f"{leaf} is a key, not a section" in str(info.value)
        assert "got {" not in str(info.value)


@pytest.mark.parametrize("argv", [["--config="], ["--config", ""], ["--config", "  "]])
def test_empty_config_path_is_one_error_line_not_the_defaults(argv):
    """Criterion: `--config "$UNSET"` exits 2 with one 'config error:' line naming --config; it
    printed the defaults' output_dir (runs/default), so the launch scripts and train.py ran
    the tiny defaults without a word."""
    proc = subprocess.run(
        [sys.executable, "-m", "vutrain.config", "--get", "output_dir", *argv, "seed=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --config is empty")
    with pytest.raises(ConfigError, match="--config is empty"):
        build_config("")


ODD_TEXTS = [
    "1e3",
    "yes",
    "off",
    "010",
    "0x10",
    "1:30",
    "null",
    "~",
    "",
    " a",
    "a #b",
    "{title}",
    "2024.10",
    "2024-01-01",
    ".inf",
    "1_000",
    "a\nb",
    "é",
    "1e-8",
    "a: b",
    "- a",
    "*x",
]


def test_saved_config_loads_back_to_the_same_config(tmp_path):
    """Criterion: save_config then build_config gives an equal RunConfig for text that looks like
    numbers, bools, nulls or YAML syntax, in string and list keys, and for floats like 1e-8."""
    path = str(tmp_path / "config.yaml")
    for text in ODD_TEXTS:
        cfg = RunConfig()
        cfg.output_dir, cfg.model.hidden_act = text, text
        cfg.eval.templates, cfg.model.lora.target_modules = [text, "{}"], [text]
        cfg.train.eps, cfg.train.beta2, cfg.data.num_samples = 1e-8, 0.1 + 0.2, 2**70
        save_config(cfg, path)
        assert build_config(path) == cfg, text
