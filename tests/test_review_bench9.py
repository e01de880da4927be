"""Review 9 of the benchmarks: figures measured in full and then a failing teardown, and a SIGTERM
to the open_clip comparison while it writes its shards.

Real components: the sweep's own subprocess per configuration with a real interpreter exit hook
(a `sitecustomize` module on PYTHONPATH) that ends it with exit code 3, as DeepSpeed's atexit or
NCCL's teardown can on a GPU; the comparison's real process group and Trainers, whose real
`cleanup` runs before an injected destroy failure; a real SIGTERM to a real comparison process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (make test installs it)",
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_bench_keeps_a_figure_measured_before_its_process_exited_nonzero(tmp_path, monkeypatch, capsys):
    """A configuration whose process printed its result and then exited non-zero (a crash at
    interpreter exit) became an error row: its measured figure was lost and the teardown message
    was shown as if training had failed. The figure is now kept, marked with the exit code and the
    teardown's message, in the JSON and the table, and the sweep exits 1."""
    from vutrain import bench

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        'if "--one" in sys.orig_argv:\n'
        "    def crash():\n"
        '        print("RuntimeError: teardown failed at exit", file=sys.stderr, flush=True)\n'
        "        os._exit(3)\n"
        "    atexit.register(crash)\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PYTHONPATH", f"{hooks}:{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "rows.json"
    code = bench.main(
        ["--batch-sizes", "4", "--steps", "1", "--warmup", "0", "--workers", "0", "--out", str(out)]
    )
    assert code == 1
    (row,) = json.loads(out.read_text(encoding="utf-8"))
    assert "error" not in row, row
    assert row["samples_per_s"] > 0 and row["step_time_s"] > 0
    assert row["exit_code"] == 3
    assert row["exit_error"] == "RuntimeError: teardown failed at exit"
    assert "(then exit 3: RuntimeError: teardown failed at exit)" in capsys.readouterr().out


@needs_open_clip
def test_compare_reports_its_figures_when_destroying_the_process_group_fails(tmp_path, monkeypatch, capsys):
    """`--compare open_clip` destroyed its process group in a `finally` before its report: a
    failure there raised past the report, so the final JSON (still marked partial), the figure and
    the exit code were lost with every figure measured. The report is now written, not partial,
    with `teardown_error`, and the run exits 1."""
    from vutrain import bench_compare, distributed

    real_cleanup = distributed.cleanup

    def cleanup_then_fail():
        real_cleanup()  # the group really is destroyed: nothing leaks into the next test
        raise RuntimeError("destroy_process_group timed out")

    monkeypatch.setattr(distributed, "cleanup", cleanup_then_fail)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "compare.json"
    argv = "--compare open_clip --preset tiny --precision fp32 --batch-sizes 4 --zero-stages 1"
    argv += f" --loss-backends torch --grad-ckpt off --steps 1 --warmup 0 --pool 4 --max-batch 0 --out {out}"
    assert bench_compare.main(argv.split()) == 1
    result = json.loads(out.read_text())
    assert result["partial"] is False
    assert result["teardown_error"] == "RuntimeError: destroy_process_group timed out"
    assert [r["variant"] for r in result["rows"]] == ["vutrain z1 torch", "open_clip"]
    assert all("error" not in r and r["samples_per_s"] > 0 for r in result["rows"]), result["rows"]
    assert (tmp_path / "compare.png").exists()
    assert "then the teardown failed" in capsys.readouterr().out


@needs_open_clip
def test_compare_stopped_while_writing_its_shards_exits_143_and_leaves_no_folder(tmp_path):
    """SIGTERM to `--compare open_clip` while it wrote its synthetic shards (before its handler was
    set) killed it outright: the `vutrain-compare-*` folder with its images stayed in the temporary
    directory. The handler is now set first: the run removes the folder, says it was stopped
    before measuring, leaves --out alone and exits 143 (128 + SIGTERM), as when stopped later."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "compare.json"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # A pool large enough that writing its shards takes seconds: the signal lands mid-write.
    cmd = [sys.executable, "-m", "vutrain.bench", "--compare", "open_clip", "--preset", "tiny"]
    cmd += ["--precision", "fp32", "--batch-sizes", "4", "--pool", "50000", "--max-batch", "0"]
    cmd += ["--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        shards = []
        while not shards and time.monotonic() < deadline and proc.poll() is None:
            shards = list(tmp.glob("vutrain-compare-*/data/train/*.tar"))
            time.sleep(0.05)
        assert shards, "the comparison never started writing its shards"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    assert "Traceback" not in stderr, stderr[-2000:]
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("vutrain-compare-")) == []
    assert not out.exists()
