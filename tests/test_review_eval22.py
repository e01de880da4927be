"""The zero-shot class prompts and the tag prompts are encoded outside the per-batch failure flag:
that is sound only because every rank encodes the same prompts, also when a class or a tag is held
by one rank's samples alone (then a text that only one rank's forward sees cannot fail there)."""

from __future__ import annotations

import json

from tar_shards import image_bytes, write_members
from tiny_eval import Engine, tiny_engine, tiny_evaluator, train_tokenizer

from helpers_dist import run_distributed

TEMPLATES = ["a photo of {}"]

SHARDS = (
    [("0000", "Autos", ["cat"], 10), ("0001", "Music", ["cat", "dog"], 90)],  # read by rank 0
    [("0002", "Music", ["dog"], 170), ("0003", "Comedy", ["origami"], 250)],  # read by rank 1
)
"""Per shard (one per rank): key, category, tags and grey of each sample."""

ONE_RANK_PROMPTS = ["a photo of Comedy", "a photo of origami"]
"""The class and the tag that only rank 1's samples hold, as prompts."""


class _TextRecorder(Engine):
    """The tiny engine, recording the attended tokens of each text-only forward (the prompts)."""

    def __init__(self, module):
        super().__init__(module)
        self.prompt_rows: list[tuple[int, ...]] = []

    def forward(self, **inputs):
        if inputs.get("pixel_values") is None:
            from vutrain.evaluate import caption_tokens

            self.prompt_rows += caption_tokens(inputs)
        return super().forward(**inputs)


def _prompts_of_rank(rank: int, world_size: int, val_shards: str, tok_dir: str) -> tuple:
    """(metrics, the prompt rows this rank's text forwards encoded, the rows of ONE_RANK_PROMPTS)."""
    from vutrain.evaluate import caption_tokens

    plain, tokenizer = tiny_engine(tok_dir)
    engine = _TextRecorder(plain.module)
    evaluator = tiny_evaluator(
        val_shards, tokenizer, rank, world_size, data__num_workers=0, eval__templates=TEMPLATES
    )
    metrics = evaluator(engine)
    return metrics, engine.prompt_rows, caption_tokens(evaluator.tokenize(ONE_RANK_PROMPTS))


def _write_shards(folder) -> str:
    for index, samples in enumerate(SHARDS):
        members = []
        for key, category, tags, grey in samples:
            meta = {"title": f"a {category.lower()} video of {' '.join(tags)}", "category_name": category}
            meta["tags"] = tags
            members += [(f"{key}.jpg", image_bytes(grey=grey)), (f"{key}.json", json.dumps(meta).encode())]
        write_members(folder / f"{index}.tar", members)
    return f"{folder}/{{0..1}}.tar"


def test_every_rank_encodes_the_same_prompts_when_one_rank_alone_holds_a_class_and_a_tag(tmp_path):
    """Two gloo ranks, one shard each; "Comedy" and "origami" are on rank 1's shard only. Both
    ranks' text forwards encode the same prompts in the same order, those two included: the class
    list is read by rank 0 and broadcast, the labels and tags are gathered before the prompts are
    built. A one-rank failure of these forwards is left to the device itself (out of memory)."""
    val_shards = _write_shards(tmp_path)
    tok_dir = train_tokenizer(val_shards, str(tmp_path / "tok"))
    (metrics0, rows0, only_rank1), (metrics1, rows1, _) = run_distributed(
        _prompts_of_rank, 2, val_shards, tok_dir, timeout_s=60.0
    )

    assert rows0 == rows1 and len(rows0) == 3 + 3  # classes Autos, Music, Comedy; tags cat, dog, origami
    assert all(row in rows0 for row in only_rank1)
    assert metrics0 == metrics1
    assert metrics0["eval/num_samples"] == 4 and metrics0["eval/zeroshot_classes"] == 3
