"""Review of ``dataset_tools inspect``: tars not named ``NNNNN.tar`` are counted under their own
reason with the remedy (never "incomplete, no stats yet", never left out), and ``--verify``
checks them; a tar appended to (a sample's members repeated), which the trainer reads as two
samples of one key, is a finding and every copy's image is decoded (real shards, real files, the
trainer's own tar reader).

Runtime: ~3 s on 2 busy cores.
"""

from __future__ import annotations

import io
import os
import tarfile

from test_faults_dataset_tools import _shard
from test_review_shards2 import MISNAMED, _folder_with_misnamed_shards

from dataset_tools import inspect_shards
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail
from vutrain.data.samples import iter_raw_samples


def test_inspect_names_tars_not_named_as_shards_with_their_remedy(tmp_path):
    # shard-00001.tar (with its parquet and stats) was listed as "incomplete shards (no stats yet)",
    # whose remedy (run the build again) never completes it; 00002.TAR was not listed at all.
    src = _folder_with_misnamed_shards(tmp_path)
    report = inspect_shards.inspect_dir(str(src))
    assert report["incomplete_shards"] == []
    assert report["tars_not_named_as_shards"] == MISNAMED
    assert report["shards"] == 1 and report["successes"] == 3
    text = inspect_shards.format_report(report)
    assert "no stats yet" not in text, text
    line = next(line for line in text.splitlines() if "not named as shards" in line)
    assert all(name in line for name in MISNAMED) and "rename it NNNNN.tar" in line


def test_inspect_verify_reports_and_checks_tars_not_named_as_shards(tmp_path, capsys):
    # --verify "checks every tar in the folder": 00002.TAR was neither checked nor named, so a
    # broken image in it passed; each misnamed tar is a finding (exit 1) and its samples are read.
    src = _folder_with_misnamed_shards(tmp_path)
    with tarfile.open(src / "00002.TAR", "a") as tar:
        _add_members(tar, "00002bad", {"jpg": b"\xff\xd8\xff not a jpeg", "json": b'{"key": "00002bad"}'})
    assert main(["inspect", str(src), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "no stats yet" not in printed, printed
    assert "00002.TAR: not named as a shard" in printed and "shard-00001.tar: not named as a shard" in printed
    assert "00003.tar.gz: compressed shard, not verified" in printed
    assert "00002.TAR: sample 00002bad lacks ['txt']" in printed, printed


def _add_members(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext, data in sorted(members.items()):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_inspect_verify_finds_a_sample_repeated_by_an_append(tmp_path, capsys):
    # `tar -r` of the last sample again, its image cut short: the trainer reads two samples of that
    # key (the first with the broken image), while --verify kept one dict entry per key, decoded
    # only the last copy's image and printed "verify: OK".
    src = tmp_path / "src"
    src.mkdir()
    path = _shard(src, 0, 3)
    key = "000000002"
    whole = render_thumbnail("vid00000002", "mqdefault")
    with tarfile.open(path, "a") as tar:
        _add_members(tar, key, {"jpg": whole, "txt": b"t", "json": f'{{"key": "{key}"}}'.encode()})
    with tarfile.open(path, "r") as tar:  # make the first copy's image the broken one
        first_jpg = next(m for m in tar if m.name == f"{key}.jpg")
    with open(path, "r+b") as fh:
        fh.seek(first_jpg.offset_data + first_jpg.size // 2)
        fh.write(b"\0" * (first_jpg.size - first_jpg.size // 2))
    assert [s["__key__"] for s in iter_raw_samples(path)].count(key) == 2  # what training reads
    assert main(["inspect", str(src), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "verify: OK" not in printed
    assert f"00000.tar: sample(s) ['{key}'] repeat a member" in printed, printed
    assert f"00000.tar: sample {key} image does not decode" in printed, printed


def test_inspect_verify_still_passes_a_sound_folder_and_names_a_tar_disagreeing_with_its_parquet(
    tmp_path, capsys
):
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(3):
        _shard(src, shard_id, 3)
    assert main(["inspect", str(src), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    with tarfile.open(src / "00001.tar", "a") as tar:  # a sample no parquet row calls a success
        _add_members(tar, "00001extra", {"jpg": render_thumbnail("x", "mqdefault"), "txt": b"t"})
    os.rename(src / "00002_stats.json", src / "00002_stats.json.bak")
    assert main(["inspect", str(src), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "00001: tar/parquet disagree (in tar only: ['00001extra']" in printed, printed
    assert "incomplete shards (no stats yet): ['00002']" in printed
