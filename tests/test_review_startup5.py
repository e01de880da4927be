"""Start-up review 5: a rank that fails before the process group exists (a config file or shards
missing on its node) tells the ranks already at the rendezvous, which stop within seconds naming it,
instead of waiting out the group's 30-minute timeout; a refused output_dir is not a "config error"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rendezvous_ranks import finish, rank_env, start
from worker_ports import free_port

from vutrain import train

import train_runner as tr

ENTRY = os.path.join(tr.REPO, "vutrain", "train.py")


def _shard_overrides(tmp_path) -> list[str]:
    """Shard lists that pass the start-up check (it only asks that the files exist)."""
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    for name in ("train.tar", "val.tar"):
        (shards / name).touch()
    return [f"data.train_shards={shards / 'train.tar'}", f"data.val_shards={shards / 'val.tar'}"]


def _start_ranks(
    tmp_path, configs: list[str], extra: list[str], tell_s: str = "20"
) -> list[subprocess.Popen]:
    """Real train.py ranks 0, 1, ... (world size len(configs)) at one rendezvous on 127.0.0.1; rank
    r reads configs[r]. A rank that fails early tries for at most `tell_s` seconds to tell the others."""
    port = free_port()
    procs = []
    for rank, config in enumerate(configs):
        env = rank_env(rank, len(configs), port, VUTRAIN_EARLY_FAILURE_WAIT_S=tell_s)
        env.update(VUTRAIN_DEVICE="cpu", DS_ACCELERATOR="cpu")
        cmd = [sys.executable, ENTRY, "--config", config, f"output_dir={tmp_path / 'run'}", *extra]
        procs.append(start(cmd, env))
    return procs


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "error: " in line and not line.startswith("[")]


def test_a_rank_missing_its_config_stops_the_others_naming_it(tmp_path):
    """Rank 1's config file does not exist on its node: ranks 0 and 2, already at the rendezvous,
    exit (within 90 s here) with one line naming rank 1 and the missing file (before: they waited out the
    30-minute group timeout)."""
    missing = str(tmp_path / "not_on_this_node.yaml")
    # Ranks 0 and 2 reach the store only after importing torch, transformers and DeepSpeed (three
    # processes at once on 2 cores): at load 18 that took over 20 s and rank 1 gave up telling them.
    procs = _start_ranks(tmp_path, [tr.TINY, missing, tr.TINY], _shard_overrides(tmp_path), tell_s="45")
    results = finish(procs, wait_s=90)
    for rank in (0, 2):
        code, out = results[rank]
        assert code == 1, f"rank {rank} did not stop in time (exit {code}):\n{out[-3000:]}"
        lines = _error_lines(out)
        assert len(lines) == 1, out[-3000:]
        assert "rank 1 failed before the rendezvous: config error:" in lines[0], lines[0]
        assert "not_on_this_node.yaml" in lines[0], lines[0]
    assert results[1][0] == 2, results[1][1][-3000:]


def test_rank_0_missing_its_config_stops_the_others_naming_it(tmp_path):
    """Rank 0's config file is missing: it prints its own line and serves it as its verdict; rank 1,
    which passed its checks, exits within 60 s with one line naming rank 0 and the file."""
    missing = str(tmp_path / "not_on_node_0.yaml")
    procs = _start_ranks(tmp_path, [missing, tr.TINY], _shard_overrides(tmp_path))
    results = finish(procs, wait_s=60)
    code, out = results[0]
    assert code == 2, out[-3000:]
    assert [line for line in _error_lines(out) if line.startswith("config error:")], out[-3000:]
    code, out = results[1]
    assert code == 1, f"rank 1 did not stop in time (exit {code}):\n{out[-3000:]}"
    lines = _error_lines(out)
    assert len(lines) == 1, out[-3000:]
    assert "rank 0 failed before the rendezvous: config error:" in lines[0], lines[0]
    assert "not_on_node_0.yaml" in lines[0], lines[0]


def test_a_refused_output_dir_is_not_called_a_config_error(tmp_path, capsys):
    """A run refused because another run holds output_dir prints `error: output_dir=... is in use`,
    not `config error:` (the config is fine), and exits 2."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom vutrain import run_lock\n"
            "run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        cwd=tr.REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["--config", tr.TINY, f"output_dir={run_dir}", *_shard_overrides(tmp_path)]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        code = train.main(argv)
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "is in use" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: output_dir="), lines[0]


@pytest.mark.parametrize("value, expected", [("", 30.0), ("2.5", 2.5), ("soon", 30.0), ("-1", 0.0)])
def test_early_failure_wait_reads_its_variable(value, expected):
    from vutrain.distributed import EARLY_FAILURE_WAIT_ENV, early_failure_wait_s

    assert early_failure_wait_s({EARLY_FAILURE_WAIT_ENV: value}) == expected
