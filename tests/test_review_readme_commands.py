"""README commands as a new user types them: `python -m vutrain.bench` and `launch/local.sh`.

The bench's results file is kept across runs and rewritten whole (an unreadable one is refused in
one line before anything is measured), and its temporary shards go when it ends; local.sh reads a
relative --config from the caller's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from worker_ports import free_port

from slurm_cluster import REPO


def run_bench(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m vutrain.bench ARGS` with its temporary directory under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "vutrain.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def bench_folders(tmp_path) -> list[str]:
    """The bench's own folders in its temporary directory (torch puts its caches there too)."""
    return [name for name in os.listdir(tmp_path / "tmp") if name.startswith("vutrain-bench-")]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--out", "cut.json"], "cannot be read as JSON"),
        (["--preset", "vit-b-99"], "--preset vit-b-99: choose one of"),
        (["--batch-sizes", "16,x"], "'x' is not an integer"),
        (["--batch-sizes", "0"], "0 is not a positive batch size"),
    ],
    ids=["cut-results-file", "unknown-preset", "batch-not-int", "batch-zero"],
)
def test_bench_refuses_bad_input_in_one_line_before_measuring(tmp_path, args, message):
    """A results file cut by a kill, an unknown preset, a bad batch size: one line, exit 2, nothing
    written (they were a JSONDecodeError / KeyError / ValueError traceback, the first two after the
    synthetic shards had been written and left behind)."""
    cut = tmp_path / "cut.json"
    cut.write_text('[{"preset": "tiny", "batch_size": 16},\n {"pres')
    proc = run_bench(args, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert cut.read_text().endswith('{"pres')  # untouched
    assert bench_folders(tmp_path) == []


def test_bench_keeps_earlier_rows_and_leaves_no_temporary_shards(tmp_path):
    """A second run appends its row to the first's; its shards and run folders (2048 images) are
    removed when it ends (every run left a vutrain-bench-* folder in the temporary directory)."""
    out = tmp_path / "results" / "train_bench.json"
    out.parent.mkdir()
    out.write_text(json.dumps([{"preset": "earlier", "batch_size": 1}]))
    args = ["--batch-sizes", "4", "--steps", "1", "--warmup", "0", "--workers", "0", "--out", str(out)]
    proc = run_bench(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["preset"] for r in rows] == ["earlier", "tiny"] and rows[1]["batch_size"] == 4
    assert os.listdir(out.parent) == ["train_bench.json"]  # no temporary file beside it
    assert bench_folders(tmp_path) == []


def test_bench_write_rows_leaves_the_previous_file_whole_when_writing_fails(tmp_path):
    """The rows are written to a temporary file and renamed: a write that stops midway (here a
    value JSON cannot hold; a kill or a full disk alike) leaves the earlier rows readable."""
    from vutrain.bench import write_rows

    out = tmp_path / "train_bench.json"
    write_rows(str(out), [{"preset": "tiny"}])
    with pytest.raises(TypeError):
        write_rows(str(out), [{"preset": "tiny"}, {"preset": object()}])
    assert json.loads(out.read_text()) == [{"preset": "tiny"}]
    assert os.listdir(tmp_path) == ["train_bench.json"]


def test_local_sh_reads_a_relative_config_from_the_callers_directory(tmp_path):
    """`~/vutrain/launch/local.sh --config my_run.yaml` from a project folder: the ranks run there,
    so the run file is found (local.sh used to cd to the checkout: "config file not found", and a
    relative output_dir landed inside it). A bad key makes the trainer stop in seconds, after it
    has read the file."""
    shutil.copy(REPO / "vutrain" / "configs" / "tiny.yaml", tmp_path / "my_run.yaml")
    port = str(free_port())
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=port, NGPUS="1", OMP_NUM_THREADS="1")
    env.pop("HOSTFILE", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), "--config", "my_run.yaml", "train.no_such_key=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config file not found" not in log, log[-3000:]
    assert "unknown config key 'train.no_such_key'" in log, log[-3000:]
