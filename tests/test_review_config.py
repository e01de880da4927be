"""Config mistakes that were found only after the process group started, and the demo's shard count."""

import pytest

from vutrain import config, demo
from vutrain.config import ConfigError, build_config, validate

SHARDS = "data.train_shards=/data/{00000..00003}.tar"


@pytest.mark.parametrize(
    "template,words",
    [
        ("{titel}", "unknown placeholder {titel}"),
        ("{category_id:03d}", "cannot be rendered"),
        ("{title", "not a valid format string"),
    ],
)
def test_caption_template_mistake_is_a_config_error(template, words, capsys):
    """validate() passed a caption template the data pipeline cannot render: training failed after
    the process group and the run directory existed (exit 1, not a config error's 2), and
    `python -m vutrain.config` said nothing."""
    cfg = build_config(None, [SHARDS, f"data.caption_template={template}"])
    with pytest.raises(ConfigError, match="data.caption_template") as err:
        validate(cfg, cuda_available=False)
    assert words in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        config.main([SHARDS, f"data.caption_template={template}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("config error: data.caption_template")


def test_valid_caption_templates_pass():
    for template in ("{title}", "{title}. tags: {tags}", "{{literal}} {title:.200}", "{category_name}"):
        validate(build_config(None, [SHARDS, f"data.caption_template={template}"]), cuda_available=False)


@pytest.mark.parametrize("value", [-1, 0])
def test_tokenizer_samples_must_be_positive(value):
    """-1 failed in the tokenizer's islice ("Stop argument for islice() must be ...", no key named)
    after the process group started; 0 trained a bytes-only tokenizer whatever model.vocab_size said."""
    cfg = build_config(None, [SHARDS, f"data.tokenizer_samples={value}"])
    with pytest.raises(ConfigError, match=f"data.tokenizer_samples must be >= 1, got {value}"):
        validate(cfg, cuda_available=False)


def test_demo_refuses_too_few_shards_before_writing_anything(tmp_path, capsys):
    """`--num-samples 512` writes one 512-sample shard for 2 CPU ranks: the demo wrote the data,
    started the ranks and failed in the data pipeline, advising dataset_tools' --shard-size."""
    out = tmp_path / "out"
    code = demo.main(["--out", str(out), "--num-samples", "512", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1] == (
        "error: --num-samples 512 in shards of --shard-size 512 makes 1 training shard(s), fewer than "
        "the 2 rank(s) x 1 loader worker(s) (data.num_workers) that each need one: pass --shard-size "
        "256 or less"
    ), err
    assert not out.exists()


def test_demo_shard_count_follows_the_workers_and_resampling():
    demo.check_shard_count(1024, 512, 2, [])  # tiny.yaml: 1 worker per rank, 2 shards
    demo.check_shard_count(64, 64, 2, ["data.resampled=true"])  # any shard count when resampled
    with pytest.raises(
        demo.DemoError, match="1 rank\\(s\\) x 4 loader worker\\(s\\).*--shard-size 256 or less"
    ):
        demo.check_shard_count(1024, 512, 1, ["data.num_workers=4"])
    with pytest.raises(demo.DemoError, match="pass --num-samples 2 or more"):
        demo.check_shard_count(1, 512, 2, [])


@pytest.mark.parametrize("override", ["output_dir=", "output_dir=null", "output_dir= "])
def test_empty_output_dir_is_a_config_error(override):
    """output_dir=$RUN_DIR with the variable unset passed validation; every rank then failed after
    the process group started with "FileNotFoundError: [Errno 2] No such file or directory: ''"."""
    with pytest.raises(ConfigError, match="output_dir is empty"):
        validate(build_config(None, [SHARDS, override]), cuda_available=False)


def _write_shard(path, metas):
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            for ext, payload in (("jpg", b"not decoded here"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tokenizer_texts_include_tags_kept_as_one_string(tmp_path):
    """Tags stored as one comma-separated string (as the tag positives and eval/tags_* accept them)
    were left out of the tokenizer's training texts; a list's tags were in."""
    from vutrain.data.tokenizer import iter_shard_texts

    shard = str(tmp_path / "00000.tar")
    metas = [
        {"title": "A cat video", "tags": ["cat", "funny"], "category_name": "Pets"},
        {"title": "A dog video", "tags": "dog, cute ,, puppy", "category_name": "Pets"},
    ]
    _write_shard(shard, metas)
    texts = list(iter_shard_texts(shard, "{title}"))
    assert texts == ["A cat video", "cat, funny", "Pets", "A dog video", "dog, cute, puppy", "Pets"]


@pytest.mark.parametrize(
    "args",
    [
        ["output_dir=runs/x", "train.resume=never", "--config", "tiny"],
        ["output_dir=runs/x", "train.resume=never", "--config=tiny"],
        ["--config", "tiny", "output_dir=runs/x", "train.resume=never"],
    ],
)
def test_config_get_reads_the_arguments_as_train_py_does(args, capsys):
    """train.py's argparse takes `k=v ... --config F`; `python -m vutrain.config --get` read --config
    only first, so the launch scripts got an empty output_dir (and on a requeue no train.resume=auto:
    a train.resume=never job started over) for arguments that train.py ran."""
    from vutrain.train import parse_args

    parsed = parse_args(args)
    assert (parsed.config, build_config(parsed.config, parsed.overrides).output_dir) == ("tiny", "runs/x")
    for key, want in (("output_dir", "runs/x"), ("train.resume", "never"), ("model.vocab_size", "1024")):
        config.main(["--get", key, *args])
        assert capsys.readouterr().out.strip() == want


def test_shipped_run_file_is_found_beside_a_folder_of_its_name(tmp_path, monkeypatch):
    """`--config vit-b-32 output_dir=vit-b-32` ran once; its re-run (or resume) from the same
    directory failed with "vit-b-32 cannot be read as YAML: [Errno 21] Is a directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vit-b-32").mkdir()
    assert build_config("vit-b-32").output_dir == "runs/vit-b-32"
    with pytest.raises(ConfigError, match="Is a directory"):  # a path is still read as given
        build_config("./vit-b-32")


@pytest.mark.parametrize("section", ["zero_optimization", "bf16", "fp16", "optimizer"])
def test_a_ds_config_section_that_is_not_an_object_is_a_config_error(tmp_path, section):
    """An older DeepSpeed form such as "zero_optimization": true passed validation, then every rank
    failed in build_ds_config with "AttributeError: 'bool' object has no attribute 'get'"."""
    import json

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({section: True}))
    cfg = build_config(None, [SHARDS, f"train.ds_config={user}"])
    with pytest.raises(ConfigError, match=f'"{section}" must be a JSON object, got true'):
        validate(cfg, cuda_available=False)


def test_the_older_bfloat16_section_is_checked_like_bf16(tmp_path):
    """DeepSpeed reads "bfloat16" only without "bf16", which the generated config always has: a
    "bfloat16": {"enabled": true} in an fp32 run was dropped without a word (the run trained in
    fp32); it is now held to train.precision as "bf16" is."""
    import json

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"bfloat16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="sets bfloat16.enabled=true but train.precision=fp32"):
        validate(build_config(None, [SHARDS, f"train.ds_config={user}"]), cuda_available=False)
    validate(
        build_config(None, [SHARDS, f"train.ds_config={user}", "train.precision=bf16"]), cuda_available=False
    )


def test_an_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    """It failed after the process group started, with a bare "FileExistsError: [Errno 17]" line."""
    path = tmp_path / "run"
    path.write_text("")
    with pytest.raises(ConfigError, match=f"output_dir={path} is a file; give a directory"):
        validate(build_config(None, [SHARDS, f"output_dir={path}"]), cuda_available=False)


@pytest.mark.parametrize("text,expected", [("010", 10), ("0x10", 16), ("9007199254740993", 2**53 + 1)])
def test_integer_values_are_read_exactly(tmp_path, text, expected):
    """YAML 1.1 made `seed=010` the octal 8 (in a run file too), and every int went through float:
    2**53 + 1 came back as 2**53."""
    assert build_config(None, [f"seed={text}"]).seed == expected
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"seed: {text}\ntrain:\n  max_steps: {text}\n")
    cfg = build_config(str(run_file))
    assert (cfg.seed, cfg.train.max_steps) == (expected, expected)


def test_a_colon_number_is_refused_not_read_as_sexagesimal(tmp_path):
    """`train.max_steps=1:30` trained 90 steps (YAML 1.1's base 60) without a word."""
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got '1:30'"):
        build_config(None, ["train.max_steps=1:30"])
    run_file = tmp_path / "run.yaml"
    run_file.write_text("train:\n  lr: 1:30.5\n")
    with pytest.raises(ConfigError, match="must be a number, got '1:30.5'"):
        build_config(str(run_file))
