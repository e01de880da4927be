"""Review of the kernels' plumbing: tile configs per device, the autotune table, compile_check and
the provenance of benchmark figures. CPU only; the conftest sets TRITON_INTERPRET. A GPU's
capability and properties are stood in for through torch.cuda's own functions (this machine has
none); the code under test runs as is."""

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import compile_check, tile_configs
from kernels.runtime import interpreting
from kernels.tile_configs import Entry, TileConfig

ROOT = Path(__file__).resolve().parent.parent
CUDA0 = torch.device("cuda", 0)


def _gpu(monkeypatch, capability, hip=None, **props):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", hip)


@pytest.mark.parametrize(
    "capability,hip,props,limit",
    [
        ((12, 0), None, {"shared_memory_per_block_optin": 101_376}, 101_376),  # RTX 5090
        ((8, 9), None, {"shared_memory_per_block_optin": 101_376}, 101_376),  # RTX 4090
        ((9, 4), "6.2.0", {"gcnArchName": "gfx942:sramecc+:xnack-"}, 65_536),  # MI300X (ROCm)
    ],
)
def test_launch_config_fits_the_shared_memory_of_the_device_itself(
    monkeypatch, tmp_path, capability, hip, props, limit
):
    """An RTX 5090 (sm_120) took the H100's square config (128x256x64, 3 stages: 144 KiB) against
    the 227 KiB of "sm_90"; it has 99 KiB per block, so the first launch at N = M >= 8192 failed
    with OutOfResources. Likewise an RTX 4090 with a table tuned on an A100, and every launch on
    ROCm (64 KiB of LDS) with the sm_90 entries its capability 9.4 mapped to. Checked by the count
    Triton compiles to on that card (sm_89: stages - 1 slabs; ROCm, sm_120: all stages)."""
    tuned = tmp_path / "tuned.json"  # tuned on an A100: fits its 163 KiB, not a 4090's 99 KiB in fp32
    tile_configs.write_tuned(
        tuned, {("sm_80", "ce_grad", "large"): Entry(TileConfig(128, 256, 64, 8, 3), "t")}
    )
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(tuned))
    _gpu(monkeypatch, capability, hip, **props)
    compiled_for = tile_configs.capability_of(CUDA0) if hip is None else None  # ROCm: not measured
    for kind in tile_configs.KINDS:
        for element_size in (2, 4):
            for n, m in [(32768, 32768), (4096, 32768), (512, 512)]:
                cfg = tile_configs.select(kind, n, m, 768, CUDA0, False, element_size)
                size = tile_configs.shared_memory_bytes(cfg, element_size, compiled_for)
                assert size <= limit, (kind, n, m, cfg)
                tile_configs.check_compilable(cfg)
    # An H100 keeps its measured config: the device's figure only tightens where it must.
    _gpu(monkeypatch, (9, 0), shared_memory_per_block_optin=232_448)
    assert tile_configs.select("ce_grad", 32768, 32768, 768, CUDA0, False, 2) == TileConfig(
        128, 256, 64, 8, 3
    )
    tile_configs.load_tuned.cache_clear()


def _table_entries(arch: str) -> set:
    return {
        (k, e.config)
        for (a, tk, _), e in tile_configs.TABLE.items()
        if a == arch
        for k in compile_check.KERNELS
        if compile_check._TABLE_KIND[k] == tk
    }


def test_compile_check_compiles_the_configs_a_launch_takes():
    """`compile_check --arch 86` (or 89) compiled the fallback entries (BD = 32) while an RTX
    30xx/40xx launches the sm_80 ones (BD = 64), and `--arch 100/120` the fallback entries for
    GPUs that launch the sm_90 ones; `--dtype fp32` compiled the table's 288 KiB config that no
    launch runs (fp32 launches fit BD to shared memory). This checks the family's table at the
    family's shared memory (`shared_memory=None`); the CLI fits it to the card's own, which is
    what an RTX 30xx/40xx/50xx launch takes (test_review_kernel_tools1.py)."""
    for arch, family in [
        (86, "sm_80"),
        (89, "sm_80"),
        (80, "sm_80"),
        (100, "sm_90"),
        (120, "sm_90"),
        (75, "fallback"),
    ]:
        assert set(compile_check.table_configs(arch)) == _table_entries(family), arch
    fp32 = compile_check.table_configs(90, element_size=4)
    assert all(tile_configs.shared_memory_bytes(c, 4) <= tile_configs.SHARED_MEMORY["sm_90"] for _, c in fp32)
    assert ("grad", TileConfig(128, 256, 32, 8, 3)) in fp32  # what an fp32 square launch runs


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--kernels", "fwdx"], "--kernels: unknown fwdx"),
        (["--config", "128,128"], "--config wants BM,BN,BD"),
        (["--config", "128,128,24,8,3"], "powers of two"),
        pytest.param(
            ["--kernels", "fwd"],
            "TRITON_INTERPRET is on",
            marks=pytest.mark.skipif(not interpreting(), reason="this process compiles for real"),
        ),
    ],
)
def test_compile_check_bad_input_is_one_usage_line(capsys, argv, message):
    """These ended in tracebacks: KeyError 'fwdx', TileConfig's TypeError, Triton's compiler on a
    non power of two block, and AttributeError 'cache_key' under TRITON_INTERPRET=1."""
    with pytest.raises(SystemExit) as e:
        compile_check.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _autotune(out: Path, losses: list[str]) -> dict:
    from kernels.bench_autotune import autotune

    return autotune([(32, 32, 32)], losses, torch.float32, torch.device("cpu"), out, "32,32,32,4,1", 1)


def test_autotune_sweeps_split_over_calls_add_up(tmp_path):
    """README: the sweep may need several 10-minute device calls, split with --shapes/--losses.
    Each call rewrote tuned_configs.json with its own winners only: the sigmoid rows of the first
    call were gone after the second."""
    first = _autotune(tmp_path, ["sigmoid"])
    second = _autotune(tmp_path, ["clip"])
    tile_configs.load_tuned.cache_clear()
    table = tile_configs.load_tuned(str(tmp_path / "tuned_configs.json"))
    kinds = {k for (_, k, _) in table}
    assert kinds == {"sig_fwd", "sig_grad", "ce_fwd", "ce_grad"}, kinds
    assert {w["kind"] for w in first["winners"]} == {"sig_fwd", "sig_grad"}
    assert {w["kind"] for w in second["winners"]} == {"ce_fwd", "ce_grad"}  # this call's own
    assert not list(tmp_path.glob("*.tmp*"))


def test_autotune_refuses_a_broken_table_before_sweeping(tmp_path):
    (tmp_path / "tuned_configs.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a tile-config table"):
        _autotune(tmp_path, ["sigmoid"])
    assert (tmp_path / "tuned_configs.json").read_text() == "{not json"  # left for the user to look at


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": "/usr/bin:/bin",
        "HOME": str(repo),
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def _commit_of(copy: Path) -> str | None:
    spec = importlib.util.spec_from_file_location(f"prov_{abs(hash(copy))}", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.commit()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_provenance_names_a_commit_only_for_code_that_commit_tracks(tmp_path):
    """`pip install .` into a .venv inside the checkout: the installed kernels/ lies in an ignored
    folder, and the benchmark JSON named the checkout's HEAD (clean) for code of any version."""
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "provenance.py", repo / "kernels" / "provenance.py")
    (repo / ".gitignore").write_text(".venv/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "c")
    head = _git(repo, "rev-parse", "HEAD")
    installed = repo / ".venv" / "lib" / "site-packages" / "kernels"
    installed.mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "provenance.py", installed / "provenance.py")
    assert _commit_of(installed / "provenance.py") is None
    assert _commit_of(repo / "kernels" / "provenance.py") == head
    with open(repo / "kernels" / "provenance.py", "a") as fh:
        fh.write("\n# edited\n")
    assert _commit_of(repo / "kernels" / "provenance.py") == head + "+dirty"
