"""Review tests: the demo's printed training figures are the ones its run reads, and an
`output_dir=` override (the demo's own --out) is refused before anything is written."""

import os
import subprocess

import pytest

from vutrain import config, demo

SMALL = ["--device", "cpu", "--num-samples", "128", "--val-samples", "24", "--shard-size", "64"]


def _launcher_command(monkeypatch, tmp_path, capsys, user: list[str]) -> tuple[list[str], str]:
    """(the deepspeed command the demo starts, the demo's stdout): the launcher is answered with
    exit code 1 at once, so the demo ends with its one-line training error."""
    started = []

    def launcher(cmd, **kwargs):
        started.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(demo.subprocess, "run", launcher)
    code = demo.main(["--out", str(tmp_path / "out"), *SMALL, *user])
    monkeypatch.undo()
    assert code == 1 and len(started) == 1, started
    return started[0], capsys.readouterr().out


def _as_the_run_reads(cmd: list[str], key: str, capsys) -> str:
    """The value of ``key`` the training run resolves from the demo's command line (train.py and
    its arguments), read by the config module's `--get`, as the launch scripts read it."""
    script = next(i for i, arg in enumerate(cmd) if arg.endswith(os.path.join("vutrain", "train.py")))
    config.main(["--get", key, *cmd[script + 1 :]])
    return capsys.readouterr().out.strip()


def test_the_printed_steps_stage_and_precision_are_the_runs(monkeypatch, tmp_path, capsys):
    """`--steps 5 train.max_steps=2` trained 2 steps while the demo printed "5 steps" (and
    "ZeRO-2" under a train.zero_stage=1): the [2/5] line now says what the run reads."""
    user = ["--steps", "5", "train.max_steps=2", "train.zero_stage=1", "train.precision=bf16"]
    cmd, out = _launcher_command(monkeypatch, tmp_path, capsys, user)
    steps = _as_the_run_reads(cmd, "train.max_steps", capsys)
    stage = _as_the_run_reads(cmd, "train.zero_stage", capsys)
    precision = _as_the_run_reads(cmd, "train.precision", capsys)
    assert (steps, stage, precision) == ("2", "1", "bf16")
    line = next(line for line in out.splitlines() if line.startswith("[2/5]"))
    assert line == f"[2/5] training the tiny preset, ZeRO-{stage}, 2 CPU ranks, {precision}, {steps} steps"


def test_without_overrides_the_printed_steps_are_the_demos(monkeypatch, tmp_path, capsys):
    """No override: --steps is what the run trains, and the tiny preset's ZeRO-2 in fp32 on CPU."""
    cmd, out = _launcher_command(monkeypatch, tmp_path, capsys, ["--steps", "7"])
    assert _as_the_run_reads(cmd, "train.max_steps", capsys) == "7"
    assert "[2/5] training the tiny preset, ZeRO-2, 2 CPU ranks, fp32, 7 steps" in out.splitlines()


@pytest.mark.parametrize("override", ["output_dir={elsewhere}", " output_dir = {elsewhere}"])
def test_an_output_dir_override_is_refused_before_anything_is_written(tmp_path, capsys, override):
    """`output_dir=X` sent the run to X while the demo read --out/run back and ended in "has no
    zero-shot evaluation", after deleting its previous data and run. Now one line naming --out,
    exit code 1, and neither folder is created."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    item = override.format(elsewhere=elsewhere)
    code = demo.main(["--out", str(out), *SMALL, "--steps", "1", item])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and "Traceback" not in captured.err, captured.err
    assert len(err) == 1 and err[0].startswith(
        f"error: {item!r}: the demo sets output_dir itself; pass --out DIR"
    ), err
    assert not out.exists() and not elsewhere.exists()
