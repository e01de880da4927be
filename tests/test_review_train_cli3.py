"""Review tests of `vutrain/train.py`'s entry point: a Ctrl-C while rank 0 draws curves.png at the
end of a finished run, and `python -m vutrain.plots`, which draws it again.

The Ctrl-C line said "at step N, with no checkpoint" and that a rerun resumes from the newest
checkpoint, of a run whose final checkpoint and done.json were written (a long run's plot takes
tens of seconds, time enough to press Ctrl-C), and named no way to draw the missing curves.png.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import train_runner
from inprocess_trainer import overrides


def test_ctrl_c_while_drawing_curves_says_the_run_finished(
    tiny_shards, tmp_path, single_process, monkeypatch, capsys
):
    import vutrain.plots
    from vutrain.train import main

    real_plot_run = vutrain.plots.plot_run

    def plot_run_given_ctrl_c(run_dir, *args, **kwargs):
        # A real SIGINT to this process: Python raises KeyboardInterrupt in the main thread here.
        os.kill(os.getpid(), signal.SIGINT)
        return real_plot_run(run_dir, *args, **kwargs)

    # The trainer imports plot_run when it draws, so it finds this one.
    monkeypatch.setattr(vutrain.plots, "plot_run", plot_run_given_ctrl_c)
    run_dir = str(tmp_path / "run")
    args = overrides(tiny_shards, run_dir, 2, eval__every=0)
    code = main(["--config", "tiny", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0].startswith(
        "error: stopped by Ctrl-C (SIGINT) while drawing curves.png, after the run "
        "finished at step 2 (its final checkpoint and done.json are written)"
    ), errors
    assert "with no checkpoint" not in errors[0], errors
    assert errors[0].endswith(f"draw it with python -m vutrain.plots {run_dir}"), errors
    assert os.path.isfile(os.path.join(run_dir, "done.json"))

    # The command the line names draws it (a fresh process: the real module entry point).
    drawn = subprocess.run(
        [sys.executable, "-m", "vutrain.plots", run_dir],
        cwd=train_runner.REPO,
        env=train_runner.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert drawn.stdout.strip() == os.path.join(run_dir, "curves.png")
    with open(os.path.join(run_dir, "curves.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_command_without_metrics_is_one_line_and_exit_1(tmp_path, capsys):
    from vutrain.plots import main

    assert main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nowhere'}/metrics.jsonl is missing or has no rows: nothing to draw"]
