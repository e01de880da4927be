"""A run file's string and list keys keep the text as written, as overrides do; a preset's image size
or caption length set beside a pretrained model.name_or_path is a config error, not ignored."""

import pytest

from vutrain.config import ConfigError, build_config, shipped_configs, validate


def _run_file(tmp_path, body: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize(
    "key, written",
    [
        ("output_dir", "2024.10"),
        ("output_dir", "1_000"),
        ("output_dir", "0x10"),
        ("model.hidden_act", "off"),
        ("eval.zeroshot_field", "yes"),
        ("train.resume", "1.0e-4"),
    ],
)
def test_run_file_string_key_keeps_the_text_as_written(tmp_path, key, written):
    """`output_dir: 2024.10` in a run file gives "2024.10" (before: "2024.1", YAML's float back as
    text), the value the override output_dir=2024.10 gives; `off` stays "off" (before: "False")."""
    section, _, name = key.rpartition(".")
    body = f"{section}:\n  {name}: {written}\n" if section else f"{name}: {written}\n"
    from_file = build_config(_run_file(tmp_path, body))
    from_override = build_config(None, [f"{key}={written}"])
    got = from_file
    for part in key.split("."):
        got = getattr(got, part)
    assert got == written
    want = from_override
    for part in key.split("."):
        want = getattr(want, part)
    assert got == want


def test_run_file_list_entries_keep_their_text_and_other_keys_stay_typed(tmp_path):
    """List entries are text as written ([off, 1.10] before: ["False", "1.1"]); null is still no value
    for a string key, numbers and bools of typed keys are still read as YAML 1.2 numbers and bools."""
    body = (
        "seed: 010\n"
        "model:\n  name_or_path:\n  lora:\n    target_modules: [off, 1.10]\n"
        "eval:\n  templates: 1.50\n"
        "train:\n  lr: 1.0e-3\n  progress_bar: off\n"
    )
    cfg = build_config(_run_file(tmp_path, body))
    assert cfg.model.lora.target_modules == ["off", "1.10"]
    assert cfg.eval.templates == ["1.50"]
    assert cfg.model.name_or_path == ""
    assert cfg.seed == 10 and cfg.train.lr == 1e-3 and cfg.train.progress_bar is False


def test_run_file_alias_shared_by_a_number_and_a_text_key(tmp_path):
    """An anchor used by an int key and a string key: each key reads it its own way."""
    cfg = build_config(_run_file(tmp_path, "seed: &n 7\noutput_dir: *n\n"))
    assert cfg.seed == 7 and cfg.output_dir == "7"


@pytest.mark.parametrize("override", ["model.image_size=336", "model.context_length=128"])
def test_preset_dims_beside_a_pretrained_model_are_a_config_error(tmp_path, override):
    """model.image_size / model.context_length apply to presets only: beside model.name_or_path they
    were ignored without a word; now a ConfigError naming the key. 0 (the default) still passes."""
    base = [f"data.train_shards={tmp_path}/{{0..1}}.tar", f"output_dir={tmp_path}/run"]
    pretrained = "model.name_or_path=openai/clip-vit-base-patch32"
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\d+ applies to presets; .* unset {key}"):
        _validated(base, pretrained, override)
    _validated(base, pretrained, f"{key}=0")
    _validated(base, override)  # a preset takes it


def _validated(base, *overrides):
    validate(build_config(None, [*base, *overrides]), cuda_available=False)


def test_shipped_run_files_still_load(tmp_path):
    """Every run file in vutrain/configs/ loads and validates with its shards set."""
    shards = [f"data.train_shards={tmp_path}/{{0..1}}.tar", f"data.val_shards={tmp_path}/0.tar"]
    for name in shipped_configs():
        validate(build_config(name, [*shards, f"output_dir={tmp_path}/{name}"]), cuda_available=False)
