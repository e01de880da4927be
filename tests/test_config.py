"""Config loading, overrides and validation: mistakes fail before any process group starts."""

import json
import os
import subprocess
import sys

import pytest

from vutrain.config import ConfigError, RunConfig, field_docs, iter_fields, load_config, reference_markdown
from vutrain.ds_config import build_ds_config

TINY = os.path.join(os.path.dirname(__file__), "..", "vutrain", "configs", "tiny.yaml")
SHARDS = "data.train_shards=/data/{00000..00003}.tar"


def test_yaml_and_overrides_are_typed():
    cfg = load_config(
        TINY,
        [
            SHARDS,
            "train.max_steps=7",
            "train.lr=3e-4",
            "model.lora.enabled=true",
            "model.lora.target_modules=q_proj,k_proj",
            "loss.local_loss=false",
        ],
    )
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.loss.local_loss is False
    assert cfg.data.train_shards == "/data/{00000..00003}.tar"


def test_every_field_has_a_docstring():
    missing = [key for key, _, _, doc in iter_fields() if not doc and not key.endswith(("model", "data"))]
    assert missing == []
    assert "ZeRO" in field_docs(type(RunConfig().train))["zero_stage"]
    assert "| `train.zero_stage` |" in reference_markdown()


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.zero_stag=2", ["unknown config key 'train.zero_stag'", "train.zero_stage"]),
        ("trian.max_steps=2", ["unknown config key 'trian'", "train"]),
        ("train.max_steps=ten", ["train.max_steps must be an integer"]),
        ("train.max_steps=1.5", ["train.max_steps must be an integer"]),
        ("model.lora.enabled=maybe", ["model.lora.enabled must be true or false"]),
        ("train.precision=fp8", ["train.precision='fp8'", "fp32, bf16, amp_bf16, fp16"]),
        ("loss.name=triplet", ["loss.name='triplet'", "clip, siglip, align_uniform"]),
        ("loss.backend=cuda", ["loss.backend='cuda'", "torch, triton, auto"]),
        ("train.zero_stage=4", ["train.zero_stage=4", "0, 1, 2, 3"]),
        ("model.preset=vit-h-14", ["model.preset='vit-h-14'", "tiny"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size must be >= 1"]),
        ("eval.every=10", ["eval.every>0 needs data.val_shards"]),
        ("train.resume=/no/such/dir", ["train.resume='/no/such/dir'"]),
        ("train", ["not key=value"]),
    ],
)
def test_bad_config_names_the_key_and_the_choices(override, words):
    overrides = [SHARDS, "data.val_shards=", "eval.every=0"] + [override]
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    for word in words:
        assert word in str(err.value)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="loss.backend=triton implements loss.name=clip and siglip"):
        load_config(TINY, [SHARDS, "loss.name=align_uniform", "loss.backend=triton"])
    with pytest.raises(ConfigError, match="lock_image and model.lock_text"):
        load_config(TINY, [SHARDS, "model.lock_image=true", "model.lock_text=true"])
    with pytest.raises(ConfigError, match="LoRA adapters are frozen too"):  # LoRA changes nothing there
        load_config(
            TINY, [SHARDS, "model.lock_image=true", "model.lock_text=true", "model.lora.enabled=true"]
        )
    with pytest.raises(ConfigError, match="data.train_shards is empty"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="model.hidden_act='relu' is not valid; choose one of: quick_gelu"):
        load_config(TINY, [SHARDS, "model.hidden_act=relu"])
    with pytest.raises(ConfigError, match="applies to presets; the pretrained model some/clip keeps"):
        load_config(TINY, [SHARDS, "model.hidden_act=gelu", "model.name_or_path=some/clip"])


def test_schedule_and_augmentation_checks(caplog):
    with pytest.raises(ConfigError, match="data.random_resized_crop=true needs data.fast_preprocess=true"):
        load_config(TINY, [SHARDS, "data.random_resized_crop=true", "data.fast_preprocess=false"])
    load_config(TINY, [SHARDS, "data.random_resized_crop=true", "data.fast_preprocess=true"])
    for ratio in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match=f"train.min_lr_ratio must be between 0 and 1.*got {ratio}"):
            load_config(TINY, [SHARDS, f"train.min_lr_ratio={ratio}"])
    load_config(TINY, [SHARDS, "train.min_lr_ratio=1"])
    with caplog.at_level("WARNING", logger="vutrain.config"):
        load_config(TINY, [SHARDS, "train.max_steps=10", "train.warmup_steps=9"])
        assert not caplog.records
        load_config(TINY, [SHARDS, "train.max_steps=10", "train.warmup_steps=10"])
    assert "train.warmup_steps=10 >= train.max_steps=10" in caplog.text


def test_fp16_needs_a_gpu():
    from vutrain.config import validate

    cfg = load_config(TINY, [SHARDS])
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        validate(cfg, cuda_available=False)
    validate(cfg, cuda_available=True)


def test_ds_config_derives_batch_keys_and_merges_user_json(tmp_path):
    cfg = load_config(
        TINY,
        [
            SHARDS,
            "train.micro_batch_size=16",
            "train.grad_accum_steps=3",
            "train.zero_stage=3",
            "train.precision=bf16",
            "train.grad_clip=0.5",
        ],
    )
    ds = build_ds_config(cfg.train, world_size=4)
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
            }
        )
    )
    cfg.train.ds_config = str(user)
    merged = build_ds_config(cfg.train, world_size=4)
    assert merged["train_batch_size"] == 192
    assert merged["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True,
        "contiguous_gradients": False,
    }  # keeps gradients aligned

    user.write_text(json.dumps({"train_batch_size": 1000}))
    with pytest.raises(ConfigError, match="train_batch_size=1000 but the run config gives 192"):
        build_ds_config(cfg.train, world_size=4)
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="stage=1 but train.zero_stage=3"):
        build_ds_config(cfg.train, world_size=4)
    for text, message in (("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")):
        user.write_text(text)  # one reader for both checks: the same one-line error
        with pytest.raises(ConfigError, match=message):
            build_ds_config(cfg.train, world_size=4)


def test_train_script_rejects_bad_key_before_starting(tmp_path):
    """The entry script exits 2 with the message, without starting a process group."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(TINY), "..", "train.py"),
            "--config",
            TINY,
            SHARDS,
            "train.zero_stag=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.zero_stag'" in proc.stderr
    assert "world_size" not in proc.stderr + proc.stdout


def test_readme_config_reference_is_current():
    """The README's config table is generated from the dataclasses; regenerate it when they change."""
    readme = open(os.path.join(os.path.dirname(TINY), "..", "..", "README.md"), encoding="utf-8").read()
    assert reference_markdown() in readme, (
        "README config reference is stale: paste python -m vutrain.config --help"
    )


def test_config_cli_bad_override_is_one_line(capsys):
    """`python -m vutrain.config` reports a bad key or file as train.py does: one line, exit 2
    (it printed a traceback and exited 1)."""
    from vutrain.config import main

    for argv in (["train.bogus=1"], ["--config", "no-such-run-file"]):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("config error: ") and err.count("\n") == 1, err


def test_config_cli_get_prints_one_key_for_the_launch_scripts(capsys):
    """`--get KEY` (launch/common.sh reads output_dir and train.resume with it): the YAML's value,
    an override's over it, "" for None, and a bad key or a section in one line."""
    from vutrain.config import main

    main(["--get", "output_dir", "--config", "tiny"])
    main(["--get", "train.resume", "--config=tiny", "train.resume=never"])
    main(["--get", "train.ds_config", "--config", "tiny", "train.ds_config=null"])
    assert capsys.readouterr().out.splitlines() == ["runs/tiny", "never", ""]
    for key, message in (("train.bogus", "is not a config key"), ("train", "is a section")):
        with pytest.raises(SystemExit) as stopped:
            main(["--get", key, "--config", "tiny"])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
