"""Review of the data streams: shard specs with URLs that webdataset.gopen cannot open."""

import pytest

from vutrain.data import TrainStream, ValStream, collect_label_values, expand_shards
from vutrain.data.shards import ShardListError, check_openable


def _identity(x):
    return x


@pytest.mark.parametrize("make", ["train", "val", "classes"])
def test_url_scheme_gopen_cannot_open_fails_at_start_up_in_one_line(make):
    """An ``s3://`` spec (README: URLs go to webdataset.gopen) was accepted, then every loader
    worker died with a traceback at the first batch: gopen has no s3 handler."""
    spec = "s3://bucket/yt/{00000..00003}.tar"
    with pytest.raises(ShardListError, match=r"cannot open s3:// URLs \(s3://bucket/yt/00000.tar\).*pipe:"):
        if make == "train":
            TrainStream(
                spec,
                preprocess=_identity,
                tokenize=_identity,
                batch_size=2,
                rank=0,
                world_size=1,
                num_workers=0,
                seed=0,
                num_samples=8,
            )
        elif make == "val":
            ValStream(spec, preprocess=_identity, tokenize=_identity, batch_size=2)
        else:
            collect_label_values(spec)  # the zero-shot classes, read before the first eval batch


def test_urls_gopen_opens_are_kept(monkeypatch):
    specs = ["https://host/{0..1}.tar", "pipe:aws s3 cp s3://bucket/0.tar -", "hf://datasets/x/0.tar"]
    for spec in specs:
        assert check_openable(expand_shards(spec), "data.train_shards") == expand_shards(spec)
    monkeypatch.setenv("GOPEN_REWRITE", "s3://bucket/=pipe:aws s3 cp s3://bucket/")  # gopen's own map
    shards = expand_shards("s3://bucket/{0..1}.tar")
    assert check_openable(shards, "data.train_shards") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]


def test_an_s3_val_spec_is_refused_before_the_process_group():
    """train.py's shard-list check (before any process group) refuses it for data.val_shards too,
    which the trainer only expands: it was found at the first eval, after training steps."""
    from vutrain.config import load_config
    from vutrain.train import check_shard_lists

    cfg = load_config("tiny", ["data.train_shards=https://host/{0..1}.tar", "data.val_shards=s3://b/v.tar"])
    with pytest.raises(ShardListError, match=r"^data.val_shards: webdataset.gopen cannot open s3://"):
        check_shard_lists(cfg, log_warnings=False)
