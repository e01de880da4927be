"""Review of ``dataset_tools inspect``, second pass: its counts on real shards whose tars and
parquets disagree (a sample in the tar alone, a success whose sample the tar lacks) agree with
what split, dedup, vocab and training read: ``samples`` is the tars' count, the histograms count
those samples (vocab's tag counts), and the printed report names the difference; a cut tar is a
finding without ``--verify`` too.

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import os

from test_review_shards5 import _folder

from dataset_tools import dedup, inspect_shards, shards, split, vocab
from dataset_tools.cli import main


def test_inspect_counts_the_samples_split_dedup_and_vocab_read(tmp_path, capsys):
    # Two samples are in shard 1's tar alone: inspect said "successes: 5" and counted the tags of 5
    # samples, while split, dedup and vocab read 7 (and so does training), with nothing telling
    # the user which number is right.
    src = _folder(tmp_path)
    report = inspect_shards.inspect_dir(src)
    split_result = split.split(src, str(tmp_path / "split"), by="hash")
    dedup_report = dedup.dedup(src, report_path=str(tmp_path / "dedup.json"))
    vocab_result = vocab.build_vocab(src, min_count=1)
    assert report["successes"] == 5  # the parquets' successful rows, as before
    read = (split_result["samples"], dedup_report["samples"], vocab_result["samples"])
    assert report["samples"] == 7 and read == (7, 7, 7)
    assert (report["samples_without_success_row"], report["successes_missing_from_tar"]) == (2, 0)
    assert report["tags"] == {t["name"]: t["count"] for t in vocab_result["tags"]} == {"a": 6, "b": 5, "c": 1}
    assert main(["inspect", src]) == 0
    printed = capsys.readouterr().out
    assert "samples: 7 in the tars (what training, split, dedup and vocab read" in printed, printed
    assert "not the 5 successes of the parquets: 2 sample(s) without a successful parquet row" in printed


def test_inspect_names_successes_missing_from_their_tar(tmp_path, capsys):
    src = _folder(tmp_path)
    whole = shards.read_tar(os.path.join(src, "00000.tar"))
    del whole["000000001"]  # the tar lost a sample its parquet calls a success
    shards.write_tar(os.path.join(src, "00000.tar"), whole.items())
    report = inspect_shards.inspect_dir(src)
    assert (report["samples"], report["successes"]) == (6, 5)
    assert (report["samples_without_success_row"], report["successes_missing_from_tar"]) == (2, 1)
    assert report["tags"]["a"] == 5  # the missing sample's tags are not in any tar
    assert main(["inspect", src]) == 0
    assert "1 success(es) missing from their tar (see inspect --verify)" in capsys.readouterr().out


def test_inspect_without_verify_names_a_cut_tar(tmp_path, capsys):
    # The counts came from the parquets alone: a tar cut short, which split, dedup and vocab refuse,
    # gave a clean report and exit 0.
    src = _folder(tmp_path)
    tar = os.path.join(src, "00001.tar")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2 + 100)
    report = inspect_shards.inspect_dir(src)
    assert report["samples"] == 3 and report["successes"] == 5
    assert any(p.startswith("00001.tar: ") and "truncated" in p for p in report["corrupt"]), report["corrupt"]
    assert main(["inspect", src]) == 1
    assert "problems: 1" in capsys.readouterr().out
