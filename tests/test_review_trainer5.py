"""How a run ends: end markers written whole or not at all, curves.png drawn by a rerun of a finished run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from inprocess_trainer import train

# A file-size limit (ulimit -f) makes a write fail part-way with EFBIG, as a full disk does with
# ENOSPC: the bytes before the limit are on disk, the rest is lost.
_MARKER_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import logging, resource, signal, sys, types
    from vutrain.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    trainer = Trainer.__new__(Trainer)
    trainer.info = types.SimpleNamespace(is_main=True)
    trainer.run_dir = sys.argv[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (4, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for name in ("done.json", "preempted.json"):
        trainer._write_marker(name, {"step": 123456, "signal": "SIGUSR1"})
    """
)


def test_a_marker_cut_short_by_a_full_disk_leaves_no_truncated_file(tmp_path):
    """done.json/preempted.json were written in place: a write cut short (full disk, kill) left a
    truncated marker ('{"st'), and the OSError turned the saved pre-emption into a traceback. Now
    the marker is whole or absent, no temporary file stays, and the failure is one warning line."""
    proc = subprocess.run(
        [sys.executable, "-c", _MARKER_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], [p.read_text() for p in tmp_path.iterdir()]
    for name in ("done.json", "preempted.json"):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING") and name in line]
        assert len(warnings) == 1, proc.stderr[-2000:]


def test_a_marker_is_written_whole(tmp_path):
    """The ordinary write still gives the documented payload, and replaces an older marker."""
    import types

    from vutrain.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.info = types.SimpleNamespace(is_main=True)
    trainer.run_dir = str(tmp_path)
    (tmp_path / "preempted.json").write_text('{"st', encoding="utf-8")
    trainer._write_marker("preempted.json", {"step": 7, "signal": "SIGTERM"})
    assert json.loads((tmp_path / "preempted.json").read_text(encoding="utf-8")) == {
        "step": 7,
        "signal": "SIGTERM",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preempted.json"]


def test_rerunning_a_finished_run_draws_its_missing_curves(tiny_shards, tmp_path, single_process):
    """A run killed after its final checkpoint (before the plot), or whose plot failed, had no
    curves.png, and rerunning it (train.resume=auto, nothing left to train) never drew one."""
    run_dir = tmp_path / "run"
    train(tiny_shards, str(run_dir), steps=2, eval__every=0, train__checkpoint_every=0)
    assert (run_dir / "curves.png").is_file()
    (run_dir / "curves.png").unlink()
    train(tiny_shards, str(run_dir), steps=2, eval__every=0, train__checkpoint_every=0)
    assert (run_dir / "curves.png").is_file()
    with open(run_dir / "done.json", encoding="utf-8") as fh:
        assert json.load(fh) == {"step": 2}
