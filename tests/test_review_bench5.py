"""Review 5 of the benchmarks: the error a failed configuration of `python -m vutrain.bench` records.

Real components: the sweep's own subprocess per configuration, a real config error raised in it,
and a real interpreter exit hook (a `sitecustomize` module on PYTHONPATH) standing in for NCCL's
exit warning, which a CPU's gloo group does not print.
"""

from __future__ import annotations

import json
import os

NCCL_EXIT_WARNING = (
    "[rank0]:[W1206 18:00:00.000000000 ProcessGroupNCCL.cpp:1250] Warning: WARNING: "
    "destroy_process_group() was not called before program exit"
)


def test_a_failed_configuration_records_the_exception_not_the_exit_warning(tmp_path, monkeypatch, capsys):
    """A configuration whose process printed anything after its traceback (on a GPU: NCCL's warning
    that the process group was never destroyed, at exit after an out-of-memory in the Trainer's
    build) recorded that last stderr line as its error, in the table and the JSON, and the real
    error was lost. The row now records the traceback's exception line."""
    from vutrain import bench

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    # In each configuration's own process (`--one`) only: the exit warning, and a Trainer build that
    # fails for real (its DeepSpeed import halted), since the bench refuses a bad setting up front.
    (hooks / "sitecustomize.py").write_text(
        f"import atexit, sys\natexit.register(lambda: print({NCCL_EXIT_WARNING!r}, file=sys.stderr))\n"
        'if "--one" in sys.orig_argv:\n    sys.modules["deepspeed"] = None\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("PYTHONPATH", f"{hooks}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "rows.json"
    code = bench.main(
        ["--batch-sizes", "4", "--steps", "1", "--warmup", "0"] + ["--workers", "0", "--out", str(out)]
    )
    assert code == 1
    (row,) = json.loads(out.read_text(encoding="utf-8"))
    assert row["error"].startswith("ModuleNotFoundError: import of deepspeed halted"), row["error"]
    printed = capsys.readouterr().out
    assert "failed: ModuleNotFoundError" in printed
    assert "ProcessGroupNCCL" not in printed
