"""Review of the training loop's start-up checks: a run file that names a key twice is refused
(YAML kept the last silently), a caption template without a placeholder is refused (every caption
was the same), and a pretrained model whose image processor makes images its vision tower cannot
take fails before the engine is built, naming the file to fix."""

from __future__ import annotations

import pytest

from vutrain import train
from vutrain.config import ConfigError, ModelConfig, build_config, load_config
from vutrain.model import preset_clip_config, preset_image_processor

SHARDS = "data.train_shards=/data/{00000..00003}.tar"


def _run_file(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_section_named_twice_is_refused(tmp_path):
    """A second `train:` section replaced the whole first one: max_steps 1000 and ZeRO-3 went back
    to the defaults (100, 2) without a word. Now a config error names the key and both lines."""
    path = _run_file(
        tmp_path, "train:\n  max_steps: 1000\n  zero_stage: 3\nmodel:\n  preset: tiny\ntrain:\n  lr: 0.0001\n"
    )
    with pytest.raises(ConfigError, match=r"run\.yaml: train appears twice \(lines 1 and 6\)"):
        load_config(path, [SHARDS])
    with pytest.raises(ConfigError, match="merge them into one"):  # `--get` of the launch scripts too
        build_config(path)


def test_a_key_named_twice_in_a_section_is_refused(tmp_path):
    """Two `lr:` lines in one section: the first was dropped silently; now both lines are named."""
    path = _run_file(tmp_path, "train:\n  lr: 0.001\n  max_steps: 5\n  lr: 0.0001\n")
    with pytest.raises(ConfigError, match=r"train\.lr appears twice \(lines 2 and 4\)"):
        build_config(path)
    # The same key in two sections is two keys, and a shipped run file reads as before.
    path = _run_file(tmp_path, "train:\n  max_steps: 5\nloss:\n  name: clip\neval:\n  every: 0\n")
    assert build_config(path).train.max_steps == 5
    assert build_config("tiny").model.preset == "tiny"


@pytest.mark.parametrize("template", ["title", "", "Video: {{title}}"])
def test_caption_template_without_a_placeholder_is_refused(template, capsys):
    """`data.caption_template=title` (the braces forgotten), an empty one, or only escaped braces:
    every sample got the same caption and the run trained on texts that tell no image from another,
    without a word. Now a config error (exit 2) says to write the fields in braces."""
    from vutrain import config

    with pytest.raises(ConfigError, match=r"has no placeholder, so every sample would get the same caption"):
        load_config(None, [SHARDS, f"data.caption_template={template}"])
    with pytest.raises(SystemExit) as exit_:
        config.main([SHARDS, f"data.caption_template={template}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("config error: data.caption_template")
    assert load_config(None, [SHARDS, "data.caption_template=Video: {title}"]).data.caption_template


@pytest.fixture(scope="module")
def non_square_pretrained(tmp_path_factory) -> str:
    """A tiny CLIPModel directory (64x64 vision tower) whose processor crops 64 high, 48 wide."""
    from transformers import CLIPModel

    from vutrain.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("non_square")
    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    tokenizer = train_bpe_tokenizer(texts, str(out / "tok"), vocab_size=300, max_length=32)
    model_dir = out / "pretrained"
    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor = preset_image_processor(64)
    processor.crop_size = {"height": 64, "width": 48}
    processor.save_pretrained(model_dir)
    return str(model_dir)


def test_pretrained_processor_crop_the_vision_tower_cannot_take(
    non_square_pretrained, tiny_shards, tmp_path, single_process, capsys
):
    """HF's CLIP vision tower takes image_size x image_size pixels only. A processor cropping 64x48
    (data.random_resized_crop keeps that shape) failed at the first step, after the engine was
    built, with transformers' "Input image size (64*48) doesn't match model (64*64)" (exit 1). Now
    the start-up says so as a config error (exit 2) naming the processor file and the size to set."""
    from inprocess_trainer import overrides

    args = overrides(
        tiny_shards,
        str(tmp_path / "run"),
        steps=1,
        **{
            "model.name_or_path": non_square_pretrained,
            "data.random_resized_crop": "true",
            "train.zero_stage": 0,
            "eval.every": 0,
            "data.val_shards": "",
        },
    )
    assert train.main(["--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower() and "Warning" not in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("config error: model.name_or_path=")
    assert "makes 64x48 images but the vision tower takes 64x64" in errors[0]
    assert '"crop_size": {"height": 64, "width": 64} in its preprocessor_config.json' in errors[0]
    assert "Traceback" not in err


def test_ds_config_naming_a_section_twice_is_refused(tmp_path):
    """A DeepSpeed JSON whose second "zero_optimization" (added at the end of a template) replaced
    the first: its CPU offload was dropped without a word, and ZeRO-2 ran on the GPU. Now a config
    error names the key; a key repeated in different objects is fine."""
    ds = tmp_path / "ds.json"
    ds.write_text(
        '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},\n'
        ' "optimizer": {"type": "AdamW", "params": {}},\n'
        ' "zero_optimization": {"stage": 2}}\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r'ds\.json: "zero_optimization" appears twice in one object'):
        load_config(None, [SHARDS, f"train.ds_config={ds}"])
    ds.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}', encoding="utf-8")
    assert load_config(None, [SHARDS, f"train.ds_config={ds}"]).train.ds_config == str(ds)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.context_length=2"], r"model.context_length must be 0 \(the preset's\) or >= 3"),
        (["seed=99999999999999999999"], r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"),
    ],
)
def test_values_that_failed_after_the_process_group_are_config_errors(overrides, message):
    """A context length of 1 or 2 left captions their start and end tokens alone (every caption the
    same ids, silently); a seed beyond torch.manual_seed's range failed after the process group."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["data.train_shards=/x/{0..1}.tar", *overrides])
    load_config("tiny", ["data.train_shards=/x/{0..1}.tar", "model.context_length=3", "seed=-1"])


def test_shards_given_as_a_yaml_list_say_how_to_join_them(tmp_path):
    """A YAML list of shard specs was "must be a string" with no hint of the '::' form."""
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  train_shards:\n    - /a/{0..1}.tar\n    - /b/{0..1}.tar\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"data.train_shards must be a string, .* join several shard specs with '::'"
    ):
        load_config(str(run))


def test_an_image_smaller_than_one_patch_is_a_config_error():
    """`model.image_size=16` with vit-b-32 (32-pixel patches) passed validation and failed at the
    first forward, after the process group: now the model check says so from the config alone."""
    from vutrain.model import check_model_config

    with pytest.raises(
        ConfigError, match=r"model.image_size=16 is smaller than the vit-b-32 preset's 32-pixel"
    ):
        check_model_config(ModelConfig(preset="vit-b-32", image_size=16))
    check_model_config(ModelConfig(preset="vit-b-32", image_size=32))
