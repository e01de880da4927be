"""Captions of invisible characters only, and .json members Python's JSON parser rejects outside
JSONDecodeError, through the real eval stream, training stream and tokenizer text reader.

Real tar shards written with tarfile, real JPEGs; the streams read them as in a run.
"""

import json

from tar_shards import image_bytes, length_ids, one_rank_stream, to_tensor, write_members

from vutrain.data import ValStream
from vutrain.data.tokenizer import iter_shard_texts

INVISIBLE_TITLES = ["\u200b", "\u2060\ufeff", "\u00ad", " \u200b\u200d ", "\u3164", "\u2800"]
HUGE_NUMBER_JSON = '{"title": "a cat", "views": ' + "1" * 5000 + "}"
DEEP_JSON = '{"title": "a dog", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _write_shard(path, samples: list[tuple[str, str]]) -> str:
    """``samples``: (key, .json text) pairs, each with the same JPEG."""
    jpeg = image_bytes()
    pairs = [((f"{key}.jpg", jpeg), (f"{key}.json", meta.encode("utf-8"))) for key, meta in samples]
    return write_members(path, [member for pair in pairs for member in pair])


def _titles(titles: list[str]) -> list[tuple[str, str]]:
    return [(f"{i:04d}", json.dumps({"title": t})) for i, t in enumerate(titles)]


def test_caption_of_invisible_characters_only_is_skipped_as_no_caption(tmp_path):
    visible = ["a cat", "\u200bzero-width before a word"]
    shard = _write_shard(tmp_path / "val.tar", _titles(INVISIBLE_TITLES + visible))

    stream = ValStream(shard, preprocess=to_tensor, tokenize=length_ids, batch_size=16)
    (batch,) = list(stream)
    assert batch["keys"] == [f"{i:04d}" for i in range(len(INVISIBLE_TITLES), len(INVISIBLE_TITLES) + 2)]
    # no visible title and no .txt: missing_caption, as a blank title (a {txt} of them is empty_caption)
    assert stream.skipped() == {"missing_caption": len(INVISIBLE_TITLES)}

    assert list(iter_shard_texts(shard, "{title}")) == visible  # nor a tokenizer training text


def test_json_that_json_rejects_with_valueerror_or_recursion_is_bad_json_in_eval(tmp_path):
    samples = [("0000", HUGE_NUMBER_JSON), ("0001", DEEP_JSON), ("0002", json.dumps({"title": "ok"}))]
    shard = _write_shard(tmp_path / "val.tar", samples)

    stream = ValStream(shard, preprocess=to_tensor, tokenize=length_ids, batch_size=16)
    (batch,) = list(stream)  # raised ValueError / RecursionError out of the eval before
    assert batch["keys"] == ["0002"]
    assert stream.skipped() == {"bad_json": 2}
    assert list(iter_shard_texts(shard, "{title}")) == ["ok"]


def test_training_stream_counts_invisible_captions_and_unparsable_json_under_their_reasons(tmp_path):
    bad = [("b0", HUGE_NUMBER_JSON), ("b1", DEEP_JSON)] + [
        (f"b{i + 2}", json.dumps({"title": t})) for i, t in enumerate(INVISIBLE_TITLES)
    ]
    shard = _write_shard(tmp_path / "train.tar", bad + [("good", json.dumps({"title": "a cat"}))])
    # shuffle_buffer 1, tar order: every bad sample is drawn before the good one
    stream = one_rank_stream(shard, num_samples=1, shuffle_buffer=1)
    with stream:
        batch = next(stream)
    assert batch["input_ids"].tolist() == [[len("a cat")]]
    # Before: the invisible captions were trained on, the JSON counted as preprocess_error.
    assert stream.skipped() == {"bad_json": 2, "missing_caption": len(INVISIBLE_TITLES)}


def test_a_title_of_invisible_characters_falls_back_to_the_txt_caption():
    """A title of zero-width characters only is no title, as a blank one: the sample's .txt is the
    caption (until 2026-12-07 the invisible title was the caption, a sample trained on no text)."""
    from vutrain.data.captions import render_caption

    assert render_caption("{title}", {"title": "\u200b\u2060"}, "the caption") == "the caption"
    assert render_caption("{title}", {"title": "\u200bzero-width before a word"}, "x") == (
        "\u200bzero-width before a word"
    )
