"""Export review 3: a pretrained run's config.yaml saved before `model.image_size` /
`model.context_length` beside `model.name_or_path` became a config error still loads for export."""

from __future__ import annotations

import pytest
import yaml

from vutrain.config import ConfigError, build_config, load_config, save_config
from vutrain.export import EXPORT_OVERRIDES, export_overrides


def _saved_config(tmp_path, *overrides) -> str:
    """A run's config.yaml as the trainer writes it (resolved), then edited as an older run held it."""
    cfg = build_config(
        None, [f"data.train_shards={tmp_path}/{{0..1}}.tar", f"output_dir={tmp_path}/run", *overrides]
    )
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    return path


def _set_model_keys(path: str, **values) -> None:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    data["model"].update(values)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def test_an_older_pretrained_run_with_preset_sizes_loads_for_export(tmp_path):
    """An older run that set model.image_size=336 beside model.name_or_path (ignored then, refused
    now) stopped its export on a setting it never used; export resets the preset-only sizes."""
    path = _saved_config(tmp_path, "model.name_or_path=openai/clip-vit-base-patch32")
    _set_model_keys(path, image_size=336, context_length=128)
    with pytest.raises(ConfigError, match="applies to presets"):
        load_config(path, EXPORT_OVERRIDES)
    cfg = load_config(path, export_overrides(path))
    assert cfg.model.name_or_path == "openai/clip-vit-base-patch32"
    assert (cfg.model.image_size, cfg.model.context_length) == (0, 0)


def test_a_preset_run_keeps_its_sizes_for_export(tmp_path):
    """A preset run's sizes shape its model: export must not reset them."""
    path = _saved_config(tmp_path, "model.image_size=64", "model.context_length=24")
    assert export_overrides(path) == list(EXPORT_OVERRIDES)
    cfg = load_config(path, export_overrides(path))
    assert (cfg.model.image_size, cfg.model.context_length) == (64, 24)
