"""dataset_tools build, eighteenth review: finalize of a build that stopped before its last shards
names the planned shards that are not built (stderr and the manifest's incomplete).

Runtime: ~15 s on 2 busy cores (one real build in a subprocess, stopped by SIGTERM after its
first shard).
"""

import json
import os
import signal
import subprocess
import sys
import time

from build_interrupt import ENV, ROOT
from small_builds import build_args, write_ids_csv

from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

_IDS = [f"vid{i:08d}" for i in range(6)]


def _wait_for_file(path, proc, seconds=120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_finalize_names_the_planned_shards_a_stopped_build_did_not_build(tmp_path, capsys):
    # The build stopped (SIGTERM) while its second of three shards downloaded: no tar of 00001 or
    # 00002 existed, so finalize wrote a manifest with "incomplete": [] and a brace of one shard,
    # as if the dataset were whole, though two thirds of the input's videos were not in it.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, _IDS)
    slow = {vid: "slow" for vid in _IDS[2:]}
    with FakeThumbnailHost(slow, slow_seconds=60, max_lifetime=120) as host:
        args = build_args(host.url_template, inp, out, "--deadline", "90", shard_size=2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataset_tools", *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _wait_for_file(out / "00000_stats.json", proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143, proc.communicate()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    capsys.readouterr()
    assert main(["finalize", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 of the 3 shards the build planned are not built: 00001.tar 00002.tar" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["incomplete"] == ["00001.tar", "00002.tar"]
    assert manifest["num_samples"] == 2 and manifest["brace"] == "00000.tar"
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2}
