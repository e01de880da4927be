"""Review of shard naming and discovery (shards, finalize, reshard): two shards of one number
(``00001`` and ``000001``) are refused in one line instead of one replacing the other; finalize's
brace pattern names exactly the shards past shard 99999 (where five-digit names overflow); a
split killed between writing its train and val publishing markers is finished whole by the rerun
(real shards, real files; the kill is a real SIGKILL in a child process).

Runtime: ~6 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, finalize, shards, split
from vutrain.data.shards import expand_shards


def _keys(folder) -> set[str]:
    return {k for n in shards.iter_shard_names(str(folder)) for k in shards.read_tar(f"{folder}/{n}.tar")}


def _as_name(src, other, shard_id: int, name: str) -> None:
    """Move shard ``shard_id`` of folder ``other`` into ``src`` under ``name`` (another padding)."""
    old = shards.shard_name(shard_id)
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.rename(os.path.join(other, f"{old}{suffix}"), os.path.join(src, f"{name}{suffix}"))


def _folder_with_two_shards_numbered_one(tmp_path):
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3)
    _shard(other, 7, 4)  # keys 000070000..: no key repeats a key of src
    _as_name(src, other, 7, "000001")
    return src


@pytest.mark.parametrize("command", ["finalize", "split", "dedup"])
def test_two_shards_of_one_number_are_refused_in_one_line(tmp_path, command):
    # Keyed by int(name), 000001 replaced 00001 (or the reverse, in listdir order): finalize's
    # sizes.json counted 7 of 10 samples and listed 00001.tar as incomplete; split and dedup left
    # its 3 samples out, saying "incomplete shard (no stats yet)" of a shard that has stats.
    src = _folder_with_two_shards_numbered_one(tmp_path)
    out = tmp_path / "out"
    run = {
        "finalize": lambda: finalize.finalize(str(src)),
        "split": lambda: split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=2),
        "dedup": lambda: dedup.dedup(str(src), filter_output=str(out)),
    }[command]
    with pytest.raises(SystemExit) as exc:
        run()
    message = str(exc.value)
    assert "\n" not in message
    assert "000001.tar and 00001.tar are both shard number 1" in message, message
    assert not (src / "sizes.json").exists() and not out.exists()


def test_shards_of_other_widths_and_other_numbers_are_all_used(tmp_path):
    # Only one number under two names is refused: 00000 beside 000001 is two shards.
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    _shard(src, 0, 3)
    _shard(other, 1, 4)
    _as_name(src, other, 1, "000001")
    manifest = finalize.finalize(str(src))
    assert manifest["num_samples"] == 7 and manifest["incomplete"] == []


def test_finalize_brace_names_exactly_the_shards_of_two_widths(tmp_path):
    # A contiguous run was one range {first..last}.tar, and a range pads every number to the width
    # of its ends: a build past shard 99999 (five-digit names overflow to 100000.tar) got
    # {00000..100000}.tar, which names 000000.tar..., none of them there. Here the same in small:
    # 00000 beside 000001 and 000002.
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    _shard(src, 0, 1)
    for shard_id in (1, 2):
        _shard(other, shard_id, 1)
        _as_name(src, other, shard_id, f"{shard_id:06d}")
    tars = sorted((f for f in os.listdir(src) if f.endswith(".tar")), key=lambda n: int(n[:-4]))
    brace = finalize.finalize(str(src))["brace"]
    spec = "::".join(os.path.join(src, part) for part in brace.split("::"))
    assert expand_shards(spec) == [os.path.join(src, t) for t in tars], brace


_KILLED_BETWEEN_MARKERS = """
import os, signal, sys
from dataset_tools import reshard, split

src, out = sys.argv[1:]
save_json = reshard.shards.save_json
markers = []

def save_one_marker_then_die(path, obj, what):
    if markers:
        os.kill(os.getpid(), signal.SIGKILL)
    markers.append(path)
    save_json(path, obj, what)

reshard.shards.save_json = save_one_marker_then_die
split.split(src, out, by="hash", val_fraction=0.5, shard_size=2)
"""


def test_a_split_killed_between_its_two_markers_is_finished_whole_by_the_rerun(tmp_path):
    # Killed after train's publishing marker and before val's, the rerun finished train only and
    # returned the full result (val: N samples) while val's shards stayed staged in
    # val/_build/partial for good: val empty, with no word; a third run refused train as not empty.
    src, out, reference = tmp_path / "src", tmp_path / "out", tmp_path / "reference"
    src.mkdir()
    for shard_id in range(3):
        _shard(src, shard_id, 4)
    expected = split.split(str(src), str(reference), by="hash", val_fraction=0.5, shard_size=2)
    assert expected["train"] and expected["val"]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_BETWEEN_MARKERS), str(src), str(out)],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    assert (out / "train" / "_build" / "split_publishing.json").exists()
    assert not (out / "val" / "_build" / "split_publishing.json").exists()
    assert split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=2) == expected
    for side in ("train", "val"):
        assert _keys(out / side) == _keys(reference / side)
        with open(out / side / "sizes.json") as f:
            assert sum(json.load(f).values()) == expected[side]
        assert sorted(os.listdir(out / side / "_build")) == ["lock"]  # nothing staged, no marker
