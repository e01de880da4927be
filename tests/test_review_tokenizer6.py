"""Half an emoji in a caption or tag (a lone UTF-16 surrogate a JSON escape kept) is U+FFFD, not a crash.

Shards are written by hand (webdataset tar: ``<key>.jpg`` + ``<key>.json``) with the JSON escape
``"\\ud83d"`` (a title cut mid-emoji in UTF-16, as the YouTube API and img2dataset's ``json.dumps``
leave it); they are read by the real text reader, a tokenizer is trained for real (``tokenizers``)
and batches are tokenized and labelled as the loader does.
"""

import io
import tarfile

from PIL import Image

from vutrain.data.labels import collate_labels, sample_label, tag_id
from vutrain.data.tokenizer import iter_shard_texts, tokenize_batch, train_bpe_tokenizer
from vutrain.tag_text import normalize_tag

EOS_ID = 1
HALF_EMOJI_JSON = '{"title": "best cat ever \\ud83d", "tags": ["cats", "fun \\ud83d"]}'
WHOLE_EMOJI_JSON = '{"title": "best cat ever \\ud83d\\ude00", "tags": ["cats"]}'


def _write_shard(path, json_texts: list[str]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 200, 40)).save(buf, "JPEG")
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(json_texts):
            for ext, data in (("jpg", buf.getvalue()), ("json", text.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_half_emoji_trains_the_tokenizer_and_tokenizes_as_replacement_char(tmp_path):
    """The tokenizer's training raised UnicodeEncodeError on rank 0 and tokenize_batch a TypeError in
    the loader worker (the whole run stopped on one title): both read it as U+FFFD, the character
    the dataset tools write, and a whole emoji escaped as a surrogate pair keeps its own tokens."""
    shard = _write_shard(tmp_path / "s.tar", [HALF_EMOJI_JSON, WHOLE_EMOJI_JSON] * 10)
    texts = list(iter_shard_texts(shard, "{title}"))
    tok = train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300, max_length=16)

    half = "best cat ever \ud83d"
    batch = tokenize_batch(tok, [half, "best cat ever \ufffd", "best cat ever \ud83d\ude00"], 16)
    ids = batch["input_ids"].tolist()
    assert ids[0] == ids[1]
    assert ids[2] == tokenize_batch(tok, ["best cat ever \U0001f600"], 16)["input_ids"][0].tolist()
    assert ids[0] != ids[2]
    assert all(EOS_ID in row for row in ids)


def test_half_emoji_tag_has_an_id_as_its_replacement_char_form():
    """loss.positives=tags hashed the tag's UTF-8 bytes: UnicodeEncodeError in the loader worker; the
    tag is now the one form "fun \ufffd", so its id equals that spelling's."""
    meta = {"tags": ["cats", "fun \ud83d"]}
    labels = sample_label(meta, "tags")
    assert labels == sorted({tag_id("cats"), tag_id("fun \ufffd")})
    assert collate_labels([labels], "tags").shape == (1, 2)
    assert normalize_tag(" FUN \ud83d ") == "fun \ufffd"
    assert normalize_tag("\ud83d\ude00 Cat") == "\U0001f600 cat"
