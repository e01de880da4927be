"""The demo's last line names curves.png only when the file is there.

The training run draws curves.png as a convenience and only warns when that fails (matplotlib
missing or broken, a full disk); the demo still printed "plot: <run>/curves.png" for a file that did
not exist. Now the line says the plot was not written and why; the demo still succeeds.
"""

import json
import sys

from vutrain import demo


def _run_dir(tmp_path):
    """A run directory as training leaves it: metrics.jsonl with loss and eval rows, no plot."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"step": 1, "train/loss": 3.2},
        {"step": 2, "train/loss": 2.9, "eval/zeroshot_top1": 0.4, "eval/zeroshot_chance": 0.04},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_a_plot_the_run_wrote_is_named(tmp_path):
    run_dir = _run_dir(tmp_path)
    (run_dir / "curves.png").write_bytes(b"\x89PNG the run's plot")
    assert demo.plot_note(str(run_dir)) == f"plot: {run_dir}/curves.png"


def test_a_plot_that_cannot_be_saved_is_said_not_written_with_the_reason(tmp_path):
    """A directory where curves.png goes: the training run warned, the demo named the file."""
    run_dir = _run_dir(tmp_path)
    (run_dir / "curves.png").mkdir()
    note = demo.plot_note(str(run_dir))
    assert note.startswith("plot not written (IsADirectoryError: "), note
    assert "curves.png" in note and note.endswith("metrics.jsonl holds the curves"), note


def test_without_matplotlib_the_plot_is_said_not_written(tmp_path, monkeypatch):
    """matplotlib not importable (None in sys.modules is Python's way to block an import)."""
    run_dir = _run_dir(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = demo.plot_note(str(run_dir))
    assert note.startswith("plot not written (ModuleNotFoundError: "), note
    assert "matplotlib" in note and not (run_dir / "curves.png").exists(), note


def test_a_plot_missing_after_training_is_drawn_again(tmp_path):
    """A plot the run could not draw (a transient failure) is drawn from metrics.jsonl."""
    run_dir = _run_dir(tmp_path)
    assert demo.plot_note(str(run_dir)) == f"plot: {run_dir}/curves.png"
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_val_shards_override_naming_shards_is_refused_before_anything_is_written(tmp_path, capsys):
    """`data.val_shards=X` met the demo's own value in the config as one key given twice and
    stopped with advice about quoting a shell's brace expansion; now the demo's own line."""
    out, other = tmp_path / "out", tmp_path / "mine" / "{00000..00001}.tar"
    code = demo.main(["--out", str(out), "--device", "cpu", f"data.val_shards={other}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: 'data.val_shards={other}': the demo evaluates on the held-out"), err
    assert "vutrain/train.py" in err[0], err
    assert not out.exists()
