"""Tuned tile tables as read and as written by the autotune sweep: a row for an unknown arch, two
rows for one launch, a candidate the GPU compiler refuses, and malformed files, each refused in
one line naming the file. Real files, the real loader and ``autotune``; CPU. Expected runtime: ~3 s.
"""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels import tile_configs
from kernels.bench_autotune import autotune, parse_candidates


def _write(path, rows):
    path.write_text(json.dumps({"entries": rows}))
    return str(path)


def _row(arch="sm_90", kind="ce_fwd", cls="small", config=(64, 64, 32, 4, 2), **kw):
    return {"arch": arch, "kind": kind, "shape_class": cls, "config": list(config), **kw}


@pytest.mark.parametrize("arch", ["sm90", "sm_100", "SM_90", "hopper"])
def test_a_row_for_an_unknown_arch_is_refused_naming_the_file_row_and_valid_arches(tmp_path, arch):
    path = _write(tmp_path / f"t_{arch}.json", [_row(), _row(arch=arch, kind="ce_grad")])
    with pytest.raises(ValueError) as info:
        tile_configs.load_tuned(path)
    message = str(info.value)
    assert "\n" not in message
    assert path in message and "entry 2" in message and repr(arch) in message
    assert "sm_90, sm_80, fallback" in message


def test_every_arch_a_table_or_a_sweep_writes_still_loads(tmp_path):
    rows = [_row(arch=arch) for arch in (*tile_configs.ARCHES, "interpreter")]
    table = tile_configs.load_tuned(_write(tmp_path / "ok.json", rows))
    assert {key[0] for key in table} == {*tile_configs.ARCHES, "interpreter"}


def test_two_rows_for_one_launch_are_refused_but_one_per_dtype_is_kept(tmp_path):
    bf16 = _row(config=(64, 64, 32, 4, 2), dtype="bfloat16")
    fp32 = _row(config=(32, 32, 32, 4, 2), dtype="float32")
    table = tile_configs.load_tuned(_write(tmp_path / "dtypes.json", [bf16, fp32]))
    assert len(table.rows) == 2

    twice = _row(config=(128, 128, 64, 8, 3), dtype="bfloat16")
    path = _write(tmp_path / "twice.json", [bf16, fp32, twice])
    both = r"entries 1 and 3 are both for sm_90/ce_fwd/small with dtype bfloat16"
    with pytest.raises(ValueError, match=both):
        tile_configs.load_tuned(path)
    undated = _write(tmp_path / "undated.json", [_row(), _row(config=(32, 32, 32, 4, 2))])
    with pytest.raises(ValueError, match="dtype any; keep one"):
        tile_configs.load_tuned(undated)


def test_a_row_of_more_warps_than_a_block_can_hold_is_refused(tmp_path):
    """64 warps are 2048 threads, over CUDA's 1024 per block: such a row passed the power-of-two
    check and would fail only at its first launch on a GPU. 32 warps load."""
    path = _write(tmp_path / "wide.json", [_row(config=(128, 128, 64, 64, 3))])
    with pytest.raises(ValueError, match=r"num_warps must be a power of two <= 32"):
        tile_configs.load_tuned(path)
    table = tile_configs.load_tuned(_write(tmp_path / "ok32.json", [_row(config=(128, 128, 64, 32, 3))]))
    assert len(table.rows) == 1
    with pytest.raises(SystemExit, match="power of two <= 32"):
        parse_candidates("64,64,32,64,1")


def test_autotune_refuses_a_candidate_the_gpu_cannot_compile_before_writing_a_table(tmp_path):
    """Under the interpreter a 3-warp candidate ran and won, and the table written with it was
    refused by every later launch and by the next sweep into the same directory."""
    with pytest.raises(SystemExit, match=r"--candidates '32,32,32,3,1': num_warps must be a power of two"):
        autotune([(40, 40, 32)], ["sigmoid"], torch.float32, torch.device("cpu"), tmp_path, "32,32,32,3,1", 1)
    assert not (tmp_path / "tuned_configs.json").exists()
    with pytest.raises(SystemExit, match="powers of two >= 16"):
        parse_candidates("32,32,32,4,1;24,32,32,4,1")
    assert parse_candidates("32,32,32,4,1") == [tile_configs.TileConfig(32, 32, 32, 4, 1)]


@pytest.mark.parametrize(
    "text",
    ["", "{not json", "{}", "[]", '{"entries": null}', '{"entries": [{"arch": "sm_90"}]}'],
    ids=["empty", "bad-json", "no-entries", "list", "null", "short-row"],
)
def test_a_malformed_table_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="fix or delete it") as info:
        tile_configs.load_tuned(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
