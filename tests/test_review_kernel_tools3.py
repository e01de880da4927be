"""Review of the tuned tile tables' plumbing (kernels.tile_configs, kernels.bench_autotune): an
autotune in a process that already read the table must merge into the file as it is on disk, not
into the copy ``load_tuned`` cached. CPU only; the conftest sets TRITON_INTERPRET."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import tile_configs
from kernels.tile_configs import Entry, TileConfig

ROOT = Path(__file__).resolve().parent.parent

_WRITE_OTHER_SWEEP = """
import sys
from kernels import tile_configs
from kernels.tile_configs import Entry, TileConfig
path = sys.argv[1]
rows = dict(tile_configs.load_tuned(path).rows)
rows[("sm_80", "sig_grad", "small", "bfloat16")] = Entry(
    TileConfig(64, 128, 64, 4, 3), "tuned: the other process", "bfloat16", None, "8.0"
)
tile_configs.write_tuned(path, rows)
"""


@pytest.mark.slow
def test_autotune_keeps_rows_another_process_wrote_after_this_one_read_the_table(tmp_path):
    """A process that launched kernels (or ran a sweep) has the table cached; another process then
    adds rows to it (a sweep split over device calls, one dtype or shape class each). An autotune in
    the first process merged its winners into the stale cached copy and wrote it back: the other
    process's rows were gone from the file."""
    from kernels.bench_autotune import autotune

    path = tmp_path / "tuned_configs.json"
    mine = Entry(TileConfig(128, 128, 64, 8, 3), "tuned: first sweep", "bfloat16", None, "8.0")
    tile_configs.write_tuned(path, {("sm_80", "ce_fwd", "small", "bfloat16"): mine})
    assert len(tile_configs.load_tuned(str(path)).rows) == 1  # read (and cached) by this process

    r = subprocess.run(
        [sys.executable, "-c", _WRITE_OTHER_SWEEP, str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]

    autotune([(32, 32, 32)], ["sigmoid"], torch.float32, torch.device("cpu"), tmp_path, "32,32,32,4,1", 1)
    tile_configs.load_tuned.cache_clear()
    rows = tile_configs.load_tuned(str(path)).rows
    assert ("sm_80", "sig_grad", "small", "bfloat16") in rows, sorted(rows)  # the other process's
    assert ("sm_80", "ce_fwd", "small", "bfloat16") in rows  # the first sweep's
    assert ("interpreter", "sig_fwd", "small", "float32") in rows  # this sweep's
