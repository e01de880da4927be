"""Review of dataset_tools (9): a killed `split` or `dedup --filter-output` leaves no shards in its
output folder (a glob over it found a part of the data) and a re-run completes it; `inspect`'s tag
histogram counts tags as training and `vocab` do; `--crop-letterbox` scales a 16-bit PNG to 8 bits
instead of clipping it (real shards written with the dataset tools' own writers, a real SIGKILL).

Runtime: ~5 s.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from test_dataset_tools_subcommands import _plain_shard

from dataset_tools import dedup, inspect_shards, shards, split
from dataset_tools.letterbox import crop_letterbox
from dataset_tools.vocab import build_vocab

# Runs a command in a child that SIGKILLs itself right after its second output shard is complete.
_KILLED_AFTER_TWO_SHARDS = """
import os, signal, sys
from dataset_tools import dedup, shards, split
write_stats, written = shards.write_stats, []
def write_stats_then_die(*args, **kwargs):
    write_stats(*args, **kwargs)
    written.append(args)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
shards.write_stats = write_stats_then_die
src, out, command = sys.argv[1:]
if command == "split":
    split.split(src, out, by="hash", val_fraction=0.5, shard_size=1)
else:
    dedup.dedup(src, filter_output=out, shard_size=1)
"""


def _run_killed(src, out, command: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_TWO_SHARDS, str(src), str(out), command],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _keys(folder) -> set[str]:
    return {k for n in shards.iter_shard_names(str(folder)) for k in shards.read_tar(f"{folder}/{n}.tar")}


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_a_killed_run_publishes_no_shards_and_a_rerun_completes_it(tmp_path, command):
    # Killed after two finished shards, both were left in OUT (OUT/train or OUT/val for split) as
    # complete shards: a glob or brace spec over the folder trained on them as if they were all.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3)
    _plain_shard(src, 1, 3)
    out = tmp_path / "out"
    _run_killed(src, out, command)
    outputs = [out / "train", out / "val"] if command == "split" else [out]
    left = [p for o in outputs for p in glob.glob(f"{o}/*.tar") + glob.glob(f"{o}/*_stats.json")]
    assert left == [], left
    if command == "split":
        counts = split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=1)
        assert counts["train"] + counts["val"] == 6
        assert _keys(out / "train") | _keys(out / "val") == _keys(src)
    else:
        report = dedup.dedup(str(src), filter_output=str(out), shard_size=1)
        assert report["kept"] == 6 and _keys(out) == _keys(src)
    assert all(not os.path.exists(o / "_build" / "partial") for o in outputs)


def test_inspect_counts_tags_as_training_and_vocab_do(tmp_path):
    # "Music", "music " and "MUSIC" are one class to training and vocab; inspect listed three.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 2, tags="Music,music ,MUSIC,Lets  Play")
    report = inspect_shards.inspect_dir(str(src))
    vocab = build_vocab(str(src), min_count=1)
    assert report["tags"] == {"music": 2, "lets play": 2}
    assert report["tags"] == {t["name"]: t["count"] for t in vocab["tags"]}


def test_crop_letterbox_scales_a_16_bit_png_instead_of_clipping_it(tmp_path):
    # cv2's BMP encoder holds 8 bits: 40000 of 65535 (61% grey) came out as 255 (white).
    img = np.zeros((100, 80, 3), np.uint16)
    img[20:80] = 40000
    ok, png = cv2.imencode(".png", img)
    assert ok
    cropped = cv2.imdecode(np.frombuffer(crop_letterbox(png.tobytes()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert cropped.shape == (60, 80, 3) and cropped.dtype == np.uint8
    assert int(cropped.min()) == int(cropped.max()) == round(40000 / 257)
