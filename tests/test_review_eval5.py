"""Review of the eval area (5): a NaN pair is a miss at every k, whatever the held-out set's size;
tags whose prompts tokenise alike are one tag in the multi-label metrics."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import torch
from bpe_tokenizers import LONG_A, LONG_B, TokenEngine, cut_alike_tokenizer, perfect_tag_model
from PIL import Image

from vutrain.evaluate import evaluate, feature_recall_at_k, recall_at_k


def test_a_nan_pair_is_a_miss_even_when_k_exceeds_the_held_out_set():
    """A NaN pair's rank was N, so with fewer than 10 held-out samples (k > N) every miss counted
    as a hit: a diverged model scored R@5 = R@10 = 1.0 on 3 samples. Now a NaN pair misses at every
    k; a finite pair still ranks within any k > N (the reference is the count, by hand)."""
    nan = torch.full((3, 3), float("nan"))
    for got in (
        recall_at_k(nan),
        feature_recall_at_k(torch.full((3, 4), float("nan")), nan[:, :1].expand(3, 4)),
    ):
        assert got == {1: 0.0, 5: 0.0, 10: 0.0}
    sim = torch.eye(4, dtype=torch.float64)
    sim[0, 0] = float("nan")  # sample 0's pair diverged, the three others are perfect
    assert recall_at_k(sim) == {1: 0.75, 5: 0.75, 10: 0.75}


def test_tags_cut_alike_at_the_context_length_are_one_tag_for_a_perfect_model(tmp_path):
    """Two long tags whose prompts the context length cuts to the same tokens (as "gta5" and
    "gta 5" tokenise alike under CLIP's tokenizer) had one embedding: for an image of one, the
    other tied its true tag and ranked first, so a model whose image features are exactly their
    tag's text features scored tags_r1 0.5 and tags_map 0.75 here. Now they are one tag (as
    zero-shot classes are merged): 1.0 each, over a vocabulary of 3."""
    image_tags = [[LONG_A], [LONG_B], ["cat"], ["dog", "Dog "]]
    tokenizer, tokenize = cut_alike_tokenizer(str(tmp_path / "tok"))
    cut = tokenize([LONG_A, LONG_B])
    assert torch.equal(cut["input_ids"][0], cut["input_ids"][1])  # the premise: cut alike
    engine, batch = perfect_tag_model(tokenizer, tokenize, image_tags)  # each image is its first tag
    metrics = evaluate(engine, [batch], [], ["{}"], tokenize, torch.float32, "cpu", batch, tag_vocab_size=10)
    assert (metrics["eval/tags_r1"], metrics["eval/tags_map"]) == (1.0, 1.0)
    assert metrics["eval/tags_vocab"] == 3.0


def _write_val_shard(path, samples: list[tuple[bytes, str]]) -> None:
    """A webdataset tar of (JPEG bytes, title) samples, keys 000000, 000001, ..."""
    with tarfile.open(path, "w") as tar:
        for i, (jpeg, title) in enumerate(samples):
            for name, payload in (
                (f"{i:06d}.jpg", jpeg),
                (f"{i:06d}.json", json.dumps({"title": title}).encode()),
            ):
                member = tarfile.TarInfo(name)
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


class _OracleEngine(TokenEngine):
    """A perfect model of a held-out set: an image's features are the mean of the text features of
    the captions it carries there (looked up by its pixels, which the model sees)."""

    def __init__(self, table: torch.Tensor, pixel_features: dict[bytes, torch.Tensor]):
        super().__init__(table)
        self.pixel_features = pixel_features

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None
        if pixel_values is not None:
            img = torch.stack([self.pixel_features[p.numpy().tobytes()] for p in pixel_values])
        return img, self.text(input_ids, attention_mask), None, None


def test_a_thumbnail_reused_under_two_titles_does_not_cost_a_perfect_model_recall(tmp_path):
    """One JPEG carried by two videos of different titles (YouTube channels reuse thumbnails):
    identical images have identical features, so they tied exactly, and a perfect model scored
    t2i R@1 0.6 (each of the two titles lost to the other video's copy) and i2t R@1 0.8. Now
    identical image bytes are one image, as identical captions are one caption: every recall is
    1.0 (4 distinct images), on shards read by ValStream in batches of 2."""
    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.tokenizer import make_tokenize, train_bpe_tokenizer
    from vutrain.data.val import ValStream
    from vutrain.model import preset_image_processor

    titles = ["red fox at dawn", "blue whale song", "green tea howto", "old car repair", "fox cub video"]
    shared = _jpeg(0)
    _write_val_shard(
        tmp_path / "val.tar",
        [(shared, titles[0]), *((_jpeg(s), t) for s, t in enumerate(titles[1:4], 1)), (shared, titles[4])],
    )
    tokenizer = train_bpe_tokenizer(titles * 4, str(tmp_path / "tok"), vocab_size=300)
    tokenize = make_tokenize(tokenizer, 16)
    stream = ValStream(
        str(tmp_path / "val.tar"),
        preprocess=make_preprocess(preset_image_processor(32)),
        tokenize=tokenize,
        batch_size=2,
    )
    torch.manual_seed(0)
    engine = _OracleEngine(torch.randn(len(tokenizer), 16), {})
    captions_of: dict[bytes, list[torch.Tensor]] = {}
    for batch in stream:
        text = engine.text(batch["input_ids"], batch["attention_mask"])
        for pixels, feature in zip(batch["pixel_values"], text, strict=True):
            captions_of.setdefault(pixels.numpy().tobytes(), []).append(feature)
    assert len(captions_of) == 4  # the premise: the reused JPEG decodes to the same pixels
    engine.pixel_features = {k: torch.stack(v).mean(dim=0) for k, v in captions_of.items()}
    metrics = evaluate(engine, stream, [], ["{}"], tokenize, torch.float32, "cpu", next(iter(stream)))
    assert metrics["eval/num_samples"] == 5.0
    recalls = {k: v for k, v in metrics.items() if k.startswith(("eval/i2t", "eval/t2i"))}
    assert recalls == {f"eval/{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
