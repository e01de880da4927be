"""The kernel tools against the card and the user: compile_check fits and judges configs by the
card's own shared memory (RTX 30xx/40xx/50xx: 99 KiB, not their table family's A100/H100
figure); a tuned row whose dtype no launch spells that way is refused in one line; a tuned row
serves only the card it was timed on (an RTX 4090's sm_80 rows not an A100); a CLI config
with a non-ASCII digit is one usage line, not a traceback. Real files, the real loader and CLIs;
CPU (one subprocess compiles a kernel for sm_86 with Triton's own toolchain).
Expected runtime: ~15 s on 2 CPU cores.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import compile_check, tile_configs
from kernels.bench_autotune import parse_candidates
from kernels.runtime import HAS_TRITON
from kernels.tile_configs import Entry, TileConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", [86, 89, 120, 121])
def test_compile_check_fits_the_table_to_the_cards_own_shared_memory(arch):
    """An RTX 5090 (sm_120) launches the sm_90 entries fitted to its 99 KiB (the square 128x256x64
    becomes BD = 32); compile_check fitted them to the H100's 227 KiB and compiled the config the
    card never runs. Each default config is now exactly what a launch on that card chooses."""
    limit = compile_check.ARCH_SHARED_MEMORY[arch]
    assert limit == 101_376
    family = tile_configs.table_arch(arch // 10)
    kinds = {"fwd": "ce_fwd", "grad": "ce_grad", "sig_fwd": "sig_fwd", "sig_grad": "sig_grad"}
    launched = {
        (k, tile_configs.choose(family, kinds[k], n, m, 768, 2, limit))
        for k in kinds
        for n, m in ((32768, 32768), (4096, 32768), (1024, 1024))
    }
    assert set(compile_check.table_configs(arch, 2, limit)) == launched
    assert all(tile_configs.shared_memory_bytes(c, 2) <= limit for _, c in launched)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_compile_check_says_when_a_config_overflows_the_cards_shared_memory():
    """Compiling never checks shared memory, the launch does: a --config of 147 KiB for an RTX 3090
    (99 KiB) printed its report like any other and failed on the card with OutOfResources."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "kernels.compile_check", "--arch", "86", "--json"]
    cmd += ["--config", "128,256,64,8,4", "--kernels", "sig_fwd"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert row["shared_limit"] == 101_376
    assert row["shared_bytes"] > row["shared_limit"]
    assert row["fits_shared_memory"] is False


def _table(tmp_path, name, **row):
    path = tmp_path / name
    base = {"arch": "sm_90", "kind": "ce_fwd", "shape_class": "small", "config": [64, 64, 32, 4, 2]}
    path.write_text(json.dumps({"entries": [base | row]}))
    return str(path)


@pytest.mark.parametrize("dtype", ["bf16", "torch.bfloat16", "BFloat16", "fp32"])
def test_a_tuned_row_with_a_dtype_no_launch_spells_is_refused_in_one_line(tmp_path, dtype):
    """Launches look rows up by torch's name ("bfloat16"): a hand-written "bf16" row loaded and
    never applied, silently, and the launch took the built-in config."""
    path = _table(tmp_path, "bf16.json", dtype=dtype)
    with pytest.raises(ValueError) as info:
        tile_configs.load_tuned(path)
    message = str(info.value)
    assert "\n" not in message and path in message
    assert f"entry 1 has dtype {dtype!r}" in message and "bfloat16, float16, float32" in message
    for good in tile_configs.TUNED_DTYPES:
        assert len(tile_configs.load_tuned(_table(tmp_path, f"{good}.json", dtype=good)).rows) == 1


@pytest.mark.parametrize("text", ["128,128,6\u00b2,8,3", "128,128,64,8,\u2463"])
def test_a_config_with_a_non_ascii_digit_is_one_usage_line(text, capsys):
    """str.isdigit() takes "²" and "④" for digits, int() refuses them: --config and --candidates
    ended in a ValueError traceback."""
    with pytest.raises(SystemExit, match=r"--candidates wants BM,BN,BD,num_warps,num_stages"):
        parse_candidates(f"128,128,64,8,3;{text}")
    with pytest.raises(SystemExit) as info:
        compile_check.main(["--config", text])
    assert info.value.code == 2
    assert "--config wants BM,BN,BD,num_warps,num_stages (five integers)" in capsys.readouterr().err
    assert parse_candidates(" 128, 128,64,8,3") == [tile_configs.TileConfig(128, 128, 64, 8, 3)]


def _stand_in_gpu(monkeypatch, capability, shared_memory):
    """torch.cuda's device queries as a card of ``capability`` answers them (no GPU here)."""
    props = SimpleNamespace(shared_memory_per_block_optin=shared_memory)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "hip", None)


def test_a_row_tuned_on_one_card_serves_only_that_card_of_its_arch(tmp_path, monkeypatch, caplog):
    """An RTX 4090 (8.9) and an A100 (8.0) both launch the sm_80 rows: a table swept on the 4090
    applied on the A100, whose timings it never saw. The row records its card; the A100 takes the
    built-in config with one log line, the 4090 its tuned one, and a row without a card applies
    to every card as before."""
    tuned = TileConfig(64, 128, 64, 4, 3)
    path = tmp_path / "tuned.json"
    here = tile_configs.triton_version()
    row = {"arch": "sm_80", "kind": "ce_grad", "shape_class": "large", "config": tuned.as_list()}
    row |= {"dtype": "bfloat16", "triton": here, "capability": "8.9"}
    path.write_text(json.dumps({"entries": [row]}))
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(path))
    monkeypatch.setattr(tile_configs, "_SKIPPED", set())
    tile_configs.load_tuned.cache_clear()
    caplog.set_level(logging.WARNING, logger=tile_configs.__name__)
    cuda0 = torch.device("cuda", 0)

    def launch():
        return tile_configs.select("ce_grad", 32768, 32768, 768, cuda0, False, 2, torch.bfloat16)

    _stand_in_gpu(monkeypatch, (8, 0), 166_912)
    assert launch() == tile_configs.TABLE[("sm_80", "ce_grad", "large")].config
    assert launch() == tile_configs.TABLE[("sm_80", "ce_grad", "large")].config
    (line,) = [r.getMessage() for r in caplog.records if r.name == tile_configs.__name__]
    assert str(path) in line and "compute capability 8.9" in line and "on 8.0" in line
    _stand_in_gpu(monkeypatch, (8, 9), 101_376)
    assert launch() == tuned
    tile_configs.write_tuned(path, {("sm_80", "ce_grad", "large"): Entry(tuned, "t", "bfloat16", here)})
    _stand_in_gpu(monkeypatch, (8, 0), 166_912)
    assert launch() == tuned
    card = Entry(tuned, "t", "bfloat16", here, "8.9")
    tile_configs.write_tuned(path, {("sm_80", "ce_grad", "large"): card})
    assert tile_configs.load_tuned(str(path)).rows == {("sm_80", "ce_grad", "large", "bfloat16"): card}
    tile_configs.load_tuned.cache_clear()
