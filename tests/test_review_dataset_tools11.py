"""Review of dataset_tools (11): `inspect --verify` finds every sample whose caption or metadata the
trainer skips as not UTF-8 (UTF-16 JSON, lone surrogates, a Latin-1 caption passed as sound), and
accepts the byte-order mark the trainer accepts; `--crop-letterbox` leaves a logo on black and a
night scene's dark sky and ground uncropped, and crops bars through a one-pixel speck (real shards
written with the dataset tools' own writers, real JPEGs, the trainer's own sample decoding).

Runtime: ~3 s.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from test_dataset_tools_subcommands import _plain_shard

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.letterbox import crop_letterbox
from vutrain.data.samples import SkipSample, decode_meta, decode_text, iter_raw_samples

# Each sample's text members as some other tool wrote them; "sound" ones the trainer reads.
_TEXTS = {
    "000000000": {"json": lambda meta: json.dumps(meta).encode("utf-16")},  # with its BOM
    "000000001": {"json": lambda meta: json.dumps(meta)[:-1].encode() + b', "t": "\xed\xa0\x80"}'},
    "000000002": {"txt": lambda meta: "caf\xe9".encode("latin-1")},
    "000000003": {"json": lambda meta: b"\xef\xbb\xbf" + json.dumps(meta).encode()},  # sound: UTF-8 BOM
    "000000004": {"txt": lambda meta: "caf\xe9 \u2603".encode()},  # sound
}


def _shard_of_odd_texts(folder) -> str:
    _plain_shard(folder, 0, len(_TEXTS))
    tar = str(folder / "00000.tar")
    samples = shards.read_tar(tar)
    for key, writers in _TEXTS.items():
        meta = json.loads(samples[key]["json"])
        for ext, write in writers.items():
            samples[key][ext] = write(meta)
    shards.write_tar(tar, list(samples.items()))
    return tar


def _keys_training_skips_as_not_utf8(tar: str) -> set[str]:
    """The trainer's own decoding of each sample's caption and metadata (an independent oracle)."""
    skipped = set()
    for raw in iter_raw_samples(tar):
        try:
            decode_meta(raw)
            decode_text(raw, "txt")
        except SkipSample as e:
            assert e.reason == "non_utf8_text", e
            skipped.add(raw["__key__"])
    return skipped


def test_verify_finds_each_sample_training_skips_as_not_utf8(tmp_path, capsys):
    # json.loads of the bytes reads UTF-16/32 and lone surrogates, and the .txt was never decoded:
    # all three samples passed "verify: OK" while training skipped them as non_utf8_text.
    tar = _shard_of_odd_texts(tmp_path)
    skipped = _keys_training_skips_as_not_utf8(tar)
    assert skipped == {"000000000", "000000001", "000000002"}

    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    flagged = {key for key in _TEXTS if f"sample {key} " in out}
    assert flagged == skipped, out
    assert "sample 000000002 txt is not UTF-8" in out and "sample 000000000 json is not UTF-8" in out
    assert "does not parse" not in out  # the UTF-8 BOM sample reads as training reads it


def _jpeg(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def _cropped_shape(img: np.ndarray) -> tuple | None:
    cropped = crop_letterbox(_jpeg(img))
    return None if cropped is None else cv2.imdecode(np.frombuffer(cropped, np.uint8), cv2.IMREAD_COLOR).shape


def _texture(rng, rows: int, width: int, low: int = 40, high: int = 220) -> np.ndarray:
    return rng.integers(low, high, (rows, width, 3)).astype(np.uint8)


def test_letterbox_leaves_dark_content_whole():
    # Black rows alone made a letterbox: a centred logo on black became a 480x100 strip (which
    # img2dataset's center_crop then cut through) and a night scene lost its sky and its ground.
    rng = np.random.default_rng(0)
    logo = np.zeros((360, 480, 3), np.uint8)
    logo[130:230, 40:440] = _texture(rng, 100, 400)
    night = np.full((360, 480, 3), 4, np.uint8)
    night[80:330] = _texture(rng, 250, 480)  # dark sky 80 rows, dark ground 30
    assert _cropped_shape(logo) is None
    assert _cropped_shape(night) is None


@pytest.mark.parametrize("size", [(360, 480), (480, 640), (91, 121)])
def test_letterbox_crops_bars_through_a_one_pixel_speck(size):
    # One bright pixel in a bar row ended the bar there: the bars were left whole (a bar cut short
    # below 5% of the height) or the crop kept a strip of them.
    height, width = size
    content = round(width * 9 / 16)
    top = (height - content) // 2
    img = np.zeros((height, width, 3), np.uint8)
    img[top : top + content] = _texture(np.random.default_rng(1), content, width)
    assert _cropped_shape(img) == (content, width, 3)  # the plain letterbox, as before
    img[top // 2, width // 3] = 255
    img[top + content + 2, width // 2] = 200
    assert _cropped_shape(img) == (content, width, 3)
