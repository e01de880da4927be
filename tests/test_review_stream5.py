"""Resampled streams resumed on another world size, and shard specs naming IPv6 URL hosts.

Real JPEG shards, one TrainStream per simulated rank (the data plan is a pure function of seed,
epoch, rank and worker). The IPv6 spec is only split here: test servers listen on 127.0.0.1 alone
(curl, which webdataset's gopen runs for http URLs, reads `http://[::1]:PORT/...` as any URL).
"""

import pytest
from stream_keys import draw_keys
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream, make_preprocess
from vutrain.data.shards import ShardListError, check_shards
from vutrain.data.synthetic import write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

IMAGE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resampled_reshape")
    info = write_synthetic(str(root / "syn"), 96, 12, image_size=IMAGE, seed=3, val_samples=8)
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 300, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return {
        "shards": info["train_shards"],
        "tokenize": make_tokenize(tok, 16),
        "preprocess": make_preprocess(processor),
        "dir": root / "syn" / "train",
    }


def _streams(data, world, batch):
    return [
        TrainStream(
            data["shards"],
            preprocess=data["preprocess"],
            tokenize=data["tokenize"],
            batch_size=batch,
            rank=r,
            world_size=world,
            num_workers=0,
            seed=5,
            shuffle_buffer=10,
            resampled=True,
        )
        for r in range(world)
    ]


def test_resampled_reshape_draws_anew_and_same_world_resume_is_exact(data, tmp_path, monkeypatch):
    old = _streams(data, 2, batch=4)
    drawn = draw_keys(old[:1], 3, tmp_path, monkeypatch)  # old rank 0's first 12 draws of epoch 0
    draw_keys(old[1:], 3, tmp_path, monkeypatch)
    states = {"ranks": [s.state_dict() for s in old]}

    new = _streams(data, 1, batch=8)  # the global batch is kept, as the trainer requires
    new[0].load_state_dict(states)
    assert new[0].batches_seen == 3 and new[0].epoch == 0
    resumed = draw_keys(new, 2, tmp_path, monkeypatch)
    # Before the fix the new rank 0 restarted old rank 0's sequence: its 16 draws began with the 12.
    assert resumed[:12] != drawn, "the resumed rank replayed the old rank's draws of this epoch"

    # On the same world size the salted sequence resumes bit for bit, then the next epoch is plain.
    mid = _streams(data, 1, batch=8)
    mid[0].load_state_dict(states)
    first = draw_keys(mid, 1, tmp_path, monkeypatch)
    again = _streams(data, 1, batch=8)
    again[0].load_state_dict(mid[0].state_dict())
    assert first + draw_keys(again, 1, tmp_path, monkeypatch) == resumed
    rest = again[0].steps_per_epoch - again[0].batches_seen
    draw_keys(again, rest, tmp_path, monkeypatch)
    assert again[0].epoch == 1 and "resample_salt" not in again[0].state_dict()


def test_ipv6_url_host_is_one_source():
    spec = "http://[::1]:8000/{00000..00001}.tar::http://[fe80::1]/b.tar"
    shards, missing = check_shards(spec)
    assert shards == ["http://[::1]:8000/00000.tar", "http://[::1]:8000/00001.tar", "http://[fe80::1]/b.tar"]
    assert missing == []
    with pytest.raises(ShardListError, match=r"matched 0 files: /nonexistent/a\.tar\. Check"):
        check_shards("http://[::1]:8000/x.tar::/nonexistent/a.tar")  # a plain '::' still splits
    with pytest.raises(ShardListError, match="matched 0 files"):
        check_shards("/nonexistent/[::1]/x.tar")  # brackets outside a URL host still split
