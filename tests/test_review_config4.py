"""Dashed overrides and `--` read alike by train.py and `python -m vutrain.config`; an empty run-file
section is its defaults; launch/common.sh's re-send interval under a second and blank-separated
SLURM host lists."""

import os
import subprocess

import pytest

from vutrain import config, train
from vutrain.config import ConfigError, EvalConfig, LoraConfig, build_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON_SH = os.path.join(REPO, "launch", "common.sh")


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  train_shards: {tmp_path}/{{0..1}}.tar\n")
    return str(path)


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


def _config_module_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        config.main(["--get", "seed", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--config", "{f}", "--seed=1"], "seed=1"),
        (["--train.max_steps=7", "--config", "{f}"], "train.max_steps=7"),
        (["--config", "{f}", "--seed", "1"], "section.key=value"),
    ],
)
def test_dashed_override_is_the_same_one_line_from_both_readers(run_file, capsys, one_process, args, hint):
    """`--seed=1` was seed=1 to `python -m vutrain.config` (the launch scripts' --get output_dir
    and train.resume) but "unrecognized arguments" with a usage block to train.py: now both refuse
    it with the same `config error:` line, which names the override without dashes."""
    argv = [arg.format(f=run_file) for arg in args]
    assert train.main(argv) == 2
    trainer_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert trainer_line == _config_module_error(argv, capsys)
    assert trainer_line.startswith("config error: ") and hint in trainer_line, trainer_line


def test_end_of_options_marker_is_read_alike(run_file, capsys):
    """`--config F -- seed=3`: argparse drops the `--` and train.py trains with seed 3, while the
    config module refused "override '--' is not key=value" (the launch scripts then got no
    output_dir)."""
    argv = ["--config", run_file, "--", "seed=3"]
    parsed = train.parse_args(argv)
    assert (parsed.config, parsed.overrides) == (run_file, ["seed=3"])
    assert (parsed.config, parsed.overrides) == config._take_config_path(argv)
    config.main(["--get", "seed", *argv])
    assert capsys.readouterr().out.strip() == "3"


def test_empty_run_file_section_is_its_defaults(tmp_path):
    """`eval:` alone on a line (YAML's null, e.g. every key commented out) was refused as
    "eval is a section"; it means the section's defaults, nested ones (`lora:`) too."""
    path = tmp_path / "run.yaml"
    path.write_text("eval:\nmodel:\n  preset: tiny\n  lora:\ntrain:\n  max_steps: 7\nloss:\n")
    cfg = build_config(str(path))
    assert cfg.eval == EvalConfig() and cfg.model.lora == LoraConfig()
    assert (cfg.train.max_steps, cfg.model.preset, cfg.loss.name) == (7, "tiny", "clip")


@pytest.mark.parametrize("override", ["eval=null", "model.lora=", "model.lora=~"])
def test_override_naming_a_section_is_still_refused(override):
    """An override sets one key: a null section there is a config error, not a silent no-op."""
    with pytest.raises(ConfigError, match="single key, not a section"):
        build_config(None, [override])


def _bash(script: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VUTRAIN_", "SLURM_"))}
    return subprocess.run(
        ["bash", "-c", f'source "{COMMON_SH}"; {script}'],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("resend", ["0.001", "0.5", "00.9"])
def test_resend_interval_under_a_second_is_one_line(resend):
    """VUTRAIN_PREEMPT_RESEND_S=0.001 was accepted and the re-sender ran `scancel --signal=USR1`
    for every job step about a thousand times a second while the ranks checkpointed."""
    done = _bash("check_preemption_settings; echo started", VUTRAIN_PREEMPT_RESEND_S=resend)
    assert done.returncode == 2 and "started" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"[vutrain-launch] ERROR: VUTRAIN_PREEMPT_RESEND_S={resend} is under 1 second: set it to 1 or "
        "more (e.g. 30), or to 0 to never resend."
    ]


@pytest.mark.parametrize("resend", ["0", "00", "0.0", "1", "01", "1.5", "30"])
def test_resend_interval_of_zero_or_a_second_and_more_is_accepted(resend):
    done = _bash("check_preemption_settings; echo started", VUTRAIN_PREEMPT_RESEND_S=resend)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "started", "")


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-02] cpu3", ["gpu01", "gpu02", "cpu3"]),
        ("a[1-2],\tb[3-4]  c", ["a1", "a2", "b3", "b4", "c"]),
        ("n[1 -2]", ["n1", "n2"]),
    ],
)
def test_host_list_blanks_separate_names(nodelist, hosts):
    """Without scontrol, `gpu[01-02] cpu3` (a hand-set node list) expanded to gpu01cpu3 and
    gpu02cpu3: each name's blanks were dropped, so the hostfile named hosts that do not exist."""
    done = _bash('expand_hostlist "$LIST"', LIST=nodelist)
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, hosts, "")
