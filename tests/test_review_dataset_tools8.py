"""Review of dataset_tools (8): shards whose images are .png or .webp (img2dataset
--encode_format, which the trainer reads) verify and dedup like .jpg ones; `vocab` names the
incomplete shards it leaves out (real shards written with the dataset tools' own writers).

Runtime: ~3 s.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image
from test_dataset_tools_subcommands import _plain_shard

from dataset_tools import dedup, inspect_shards, shards
from dataset_tools.cli import main


def _reencode(data: bytes, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, fmt)
    return out.getvalue()


def _with_image_format(folder, name: str, ext: str, fmt: str) -> dict[str, dict[str, bytes]]:
    """Shard ``name`` rewritten with each sample's .jpg re-encoded as ``fmt`` under ``.ext``."""
    tar = os.path.join(folder, f"{name}.tar")
    samples = shards.read_tar(tar)
    for members in samples.values():
        members[ext] = _reencode(members.pop("jpg"), fmt)
    shards.write_tar(tar, samples.items())
    return samples


def _png_and_webp_folder(tmp_path):
    """Shard 00000 as .webp, shard 00001 as .png; 000010002 shows 000000000's image again."""
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3)
    _plain_shard(src, 1, 3)
    first = shards.read_tar(str(src / "00000.tar"))["000000000"]["jpg"]
    tar = str(src / "00001.tar")
    samples = shards.read_tar(tar)
    samples["000010002"]["jpg"] = first
    shards.write_tar(tar, samples.items())
    _with_image_format(str(src), "00000", "webp", "WEBP")
    _with_image_format(str(src), "00001", "png", "PNG")
    return src


def test_png_and_webp_shards_verify_and_dedup_like_jpg_ones(tmp_path):
    # --verify reported every sample as "lacks ['jpg']" (exit 1), and dedup stopped at the first
    # sample with "has no .jpg ... run the same build again", which wrote the same shards again.
    src = _png_and_webp_folder(tmp_path)
    assert inspect_shards.inspect_dir(str(src), verify=True)["corrupt"] == []
    report = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert [[m["key"] for m in g] for g in report["groups"]] == [["000000000", "000010002"]]
    assert report["samples"] == 6 and report["kept"] == 5
    kept = {k: m for n in ("00000",) for k, m in shards.read_tar(str(tmp_path / "out" / f"{n}.tar")).items()}
    assert "000010002" not in kept and set(kept["000000000"]) == {"webp", "txt", "json"}


def test_verify_still_finds_a_sample_without_an_image_or_with_a_broken_png(tmp_path):
    # Accepting png/webp must not pass a sample with no image at all, nor one that does not decode.
    src = _png_and_webp_folder(tmp_path)
    tar = str(src / "00001.tar")
    samples = shards.read_tar(tar)
    del samples["000010000"]["png"]
    samples["000010001"]["png"] = samples["000010001"]["png"][:100]
    shards.write_tar(tar, samples.items())
    corrupt = inspect_shards.inspect_dir(str(src), verify=True)["corrupt"]
    assert any("000010000 lacks" in p for p in corrupt), corrupt
    assert any("000010001 image does not decode" in p for p in corrupt), corrupt
    assert not any("00000.tar" in p for p in corrupt), corrupt


def test_vocab_names_the_incomplete_shards_it_leaves_out(tmp_path, capsys):
    # A shard without stats (a build still running, or stopped) was left out without a word: the
    # vocabulary of a half-built folder passed for one of the whole folder.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3, tags="cat,dog")
    _plain_shard(src, 1, 3, tags="cat,bird")
    os.remove(src / "00001_stats.json")
    out = tmp_path / "vocab.json"
    assert main(["vocab", str(src), "--output", str(out), "--min-count", "1"]) == 0
    written = json.loads(out.read_text())
    assert {e["name"]: e["count"] for e in written["tags"]} == {"cat": 3, "dog": 3}
    assert written["skipped_incomplete_shards"] == ["00001"]
    assert "vocab: skipping 1 incomplete shard(s) (no stats yet): 00001" in capsys.readouterr().err
