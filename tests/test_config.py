"""Config loading, overrides and validation: mistakes fail before any process group starts."""

import json
import os
import subprocess
import sys

import pytest

from vutrain.config import (
    ConfigError,
    RunConfig,
    build_config,
    field_docs,
    iter_fields,
    load_config,
    reference_markdown,
)
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
        # nan passed every range check (nan < 0 is False) and trained on NaN; true was 1.0
        ("train.lr=nan", ["train.lr must be a finite number"]),
        ("train.grad_clip=.inf", ["train.grad_clip must be a finite number"]),
        ("train.lr=true", ["train.lr must be a number, got True"]),
        ("model.lora.enabled=maybe", ["model.lora.enabled must be true or false"]),
        ("train.precision=fp8", ["train.precision='fp8'", "fp32, bf16, amp_bf16, fp16"]),
        ("loss.name=triplet", ["loss.name='triplet'", "clip, siglip, align_uniform"]),
        ("loss.backend=cuda", ["loss.backend='cuda'", "torch, triton, auto"]),
        ("train.zero_stage=4", ["train.zero_stage=4", "0, 1, 2, 3"]),
        ("model.preset=vit-h-14", ["model.preset='vit-h-14'", "tiny"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size must be >= 1"]),
        # AdamW and peft refused these only after the process group and the model were built
        ("train.beta2=1.0", ["train.beta2 must be in [0, 1), got 1.0"]),
        ("train.beta1=-0.1", ["train.beta1 must be in [0, 1)"]),
        ("train.eps=0", ["train.eps must be > 0"]),
        ("model.lora.dropout=1.5", ["model.lora.dropout must be in [0, 1)"]),
        ("model.lora.enabled=true model.lora.r=0", ["model.lora.r must be >= 1"]),
        ("eval.every=10", ["eval.every>0 needs data.val_shards"]),
        ("train.resume=/no/such/dir", ["train.resume='/no/such/dir'"]),
        ("train", ["not key=value"]),
    ],
)
def test_bad_config_names_the_key_and_the_choices(override, words):
    overrides = [SHARDS, "data.val_shards=", "eval.every=0"] + override.split(" ")
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
    user.write_bytes(b'{"zero_optimization": {"stage": 3}, "comment": "\xe9t\xe9"}')  # Latin-1
    with pytest.raises(ConfigError, match="cannot be read .*pass a JSON file"):  # was a traceback
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


@pytest.mark.parametrize(
    "override, want",
    [
        ("data.caption_template={title}", "{title}"),  # was: "must set a single key, not a section"
        ("data.caption_template='{title}. tags: {tags}'", "{title}. tags: {tags}"),
        ("output_dir=007", "007"),  # was "7": another run directory
        ("output_dir=yes", "yes"),  # was "True"
        ("output_dir=runs/a #1", "runs/a #1"),  # was "runs/a": YAML read a comment
        ("eval.zeroshot_field=no", "no"),  # was "False"
        ("train.ds_config=null", ""),
    ],
)
def test_string_override_is_the_text_as_typed(override, want):
    """A string key takes the override's text: YAML only unquotes it and reads null (parsed as YAML,
    a {placeholder} was a mapping and 007, yes or a '#' changed the value without a word)."""
    cfg = load_config(TINY, [SHARDS, override])
    value = cfg
    for part in override.split("=", 1)[0].split("."):
        value = getattr(value, part)
    assert value == want


@pytest.mark.parametrize(
    "override, want",
    [
        ("eval.templates={}", ["{}"]),  # was: "must set a single key, not a section"
        ("eval.templates=[a photo of {}., {}]", ["a photo of {}.", "{}"]),  # was "[a photo of {}." ...
        ("model.lora.target_modules=[q_proj, k_proj]", ["q_proj", "k_proj"]),
        ("model.lora.target_modules=null", []),  # was ["None"]
    ],
)
def test_list_override_is_the_text_as_typed(override, want):
    cfg = build_config(TINY, [SHARDS, override])
    section, key = override.split("=", 1)[0].rsplit(".", 1)
    value = cfg
    for part in section.split("."):
        value = getattr(value, part)
    assert getattr(value, key) == want
    with pytest.raises(ConfigError, match="model.lora.enabled needs model.lora.target_modules"):
        load_config(TINY, [SHARDS, "model.lora.enabled=true", "model.lora.target_modules=null"])


@pytest.mark.parametrize(
    "precision, section, words",
    [
        (
            "fp32",
            {"enabled": True, "dtype": "bfloat16"},
            "torch_autocast.enabled=true but train.precision=fp32",
        ),
        ("bf16", {"enabled": True}, "torch_autocast.enabled=true but train.precision=bf16"),
        ("amp_bf16", {"enabled": False}, "torch_autocast.enabled=false but train.precision=amp_bf16"),
        ("amp_bf16", {"dtype": "float16"}, 'torch_autocast.dtype="float16" but train.precision=amp_bf16'),
    ],
)
def test_user_ds_config_autocast_must_agree_with_precision(tmp_path, precision, section, words):
    """DeepSpeed autocasts the forward as a user JSON's torch_autocast says: an fp32 run trained under
    bf16 autocast, an amp_bf16 one under fp16 (no loss scale), while config.yaml said otherwise."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"torch_autocast": section}))
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(TINY, [SHARDS, f"train.precision={precision}", f"train.ds_config={user}"])


def test_offload_without_an_optimizer_section_is_refused_at_config_time(tmp_path):
    """The trainer's own torch AdamW is a "client" optimizer, which DeepSpeed refuses under
    ZeRO-Offload: a ZeRORuntimeException traceback from every rank after the process group."""
    user = tmp_path / "ds.json"
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    user.write_text(json.dumps(offload))
    with pytest.raises(ConfigError, match='offloads the optimizer \\(cpu\\) but has no "optimizer" section'):
        load_config(TINY, [SHARDS, f"train.ds_config={user}"])
    for fix in ({"zero_force_ds_cpu_optimizer": False}, {"optimizer": {"type": "AdamW", "params": {}}}):
        user.write_text(json.dumps({**offload, **fix}))
        load_config(TINY, [SHARDS, f"train.ds_config={user}"])


def test_user_ds_config_autocast_that_agrees_is_merged(tmp_path):
    user = tmp_path / "ds.json"
    for precision, section in (
        ("amp_bf16", {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": ["torch.nn.Linear"]}),
        ("amp_bf16", {"enabled": "auto", "dtype": "auto"}),
        ("fp32", {"enabled": False}),
        ("fp32", {"dtype": "float16"}),  # not enabled: the dtype changes nothing
    ):
        user.write_text(json.dumps({"torch_autocast": section}))
        cfg = load_config(TINY, [SHARDS, f"train.precision={precision}", f"train.ds_config={user}"])
        autocast = build_ds_config(cfg.train, world_size=1).get("torch_autocast", {})
        assert autocast.get("enabled", False) == (precision == "amp_bf16")
    for template in sorted(
        os.listdir(os.path.join(os.path.dirname(TINY), "..", "..", "launch", "ds_configs"))
    ):
        path = os.path.join(os.path.dirname(TINY), "..", "..", "launch", "ds_configs", template)
        # The template's own ZeRO stage: the config check refuses a JSON stage that disagrees with
        # train.zero_stage, as start-up does.
        with open(path) as f:
            stage = f"train.zero_stage={json.load(f)['zero_optimization']['stage']}"
        for precision in ("fp32", "bf16", "amp_bf16"):
            load_config(TINY, [SHARDS, stage, f"train.precision={precision}", f"train.ds_config={path}"])


@pytest.mark.parametrize(
    "override, unknown, hint",
    [
        ("train.zero_stag=2", "train.zero_stag", "train.zero_stage"),
        ("train.batch_size=8", "train.batch_size", "train.micro_batch_size"),
        ("train.preset=vit-b-32", "train.preset", "model.preset"),  # the right key in the wrong section
        ("lr=1e-4", "lr", "train.lr"),
        ("trian.max_steps=2", "trian", "train.max_steps"),
        ("model.lora.rank=8", "model.lora.rank", "model.lora.r"),
    ],
)
def test_unknown_key_suggests_the_close_one(override, unknown, hint):
    """A typo or a key in the wrong section names the key it probably meant, not only the
    section's list of keys (which a key in the wrong section is not in)."""
    with pytest.raises(ConfigError) as err:
        build_config(TINY, [override])
    assert f"unknown config key '{unknown}' (did you mean {hint}?); valid keys here:" in str(err.value)


def test_yaml_key_in_the_wrong_section_names_its_section(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("train:\n  preset: vit-b-32\n  max_steps: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.preset' \(did you mean model.preset\?\)"
    ):
        build_config(str(run_file))
    run_file.write_text("trian:\n  lr: 1.0e-4\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean train\?\)"):
        build_config(str(run_file))
    with pytest.raises(ConfigError) as err:  # nothing close: no guess
        build_config(TINY, ["train.foo=1"])
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("data:\n  caption_template: {title}. tags: {tags}\n", "is not valid YAML: expected <block end>"),
        ("data:\n\ttrain_shards: x\n", "is not valid YAML: found character '\\t'"),
        (b"\xd0\x00 train:", "cannot be read as YAML: 'utf-8' codec can't decode"),
        (None, "cannot be read as YAML: [Errno 21] Is a directory"),
    ],
)
def test_unreadable_run_file_is_a_one_line_config_error(tmp_path, capsys, text, words):
    """A run file YAML cannot parse (an unquoted '{', a tab) or that is not a UTF-8 file ends in one
    `config error:` line and exit 2, as a bad key does; it was a traceback from every rank."""
    from vutrain import train

    run_file = tmp_path / "run.yaml"
    if text is None:
        run_file.mkdir()
    elif isinstance(text, bytes):
        run_file.write_bytes(text)
    else:
        run_file.write_text(text)
    assert train.main(["--config", str(run_file), SHARDS]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {run_file} ") and words in lines[0], lines
