"""Review of the eval area (8): evaluation on 2 and 3 real gloo ranks over real shards that split
unevenly (a rank with no sample, a rank with one, a set smaller than the world), with duplicate
captions across ranks, an undecodable image on one rank, a class on one rank's share only and a
batch size that divides no share: every rank returns the metrics a float64 reference computes in
one process over the whole set; a pre-emption on one rank stops every rank at the same batch."""

from __future__ import annotations

import io
import json
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_dist import run_distributed

DIM, VOCAB, CONTEXT = 8, 64, 6
TEMPLATES = ["a thumbnail of {}.", "{} video"]


def _word_id(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (VOCAB - 1)


def _tokenize(texts: list[str]) -> dict:
    """Word ids by hash (the same in every process), right-padded with 0 to CONTEXT."""
    ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    mask = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [_word_id(w) for w in text.lower().split()][:CONTEXT]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        mask[row, : len(words)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _word_vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((VOCAB, DIM))


def _image_vectors(count: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, DIM))


def _preprocess(image: Image.Image) -> torch.Tensor:
    """The image's id, read back from its grey level (JPEG keeps a flat grey within +-1)."""
    grey = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
    return torch.full((3, 2, 2), round(grey / 8.0))


class _Engine(torch.nn.Module):
    """Image features: a fixed vector per image id; text: the normalised mean of word vectors."""

    def __init__(self, images: int):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": DIM})})()
        self.words = torch.tensor(_word_vectors(), dtype=torch.float32)
        self.images = torch.nn.functional.normalize(torch.tensor(_image_vectors(images), dtype=torch.float32))
        self.forwards = 0

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        self.forwards += 1
        mask = attention_mask[..., None].float()
        txt = torch.nn.functional.normalize((self.words[input_ids] * mask).sum(1) / mask.sum(1).clamp_min(1))
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, txt, None, None


def _jpeg(image_id: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (8 * image_id,) * 3).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _write_shard(path, samples: list[dict]) -> str:
    """samples: dicts of key, image (an id, or raw bytes for a broken image), title, category."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            image = s["image"] if isinstance(s["image"], bytes) else _jpeg(s["image"])
            meta = {"title": s["title"], "category_name": s["category"]}
            for ext, payload in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _samples(count: int, broken: set[int]) -> list[dict]:
    """`count` samples; titles repeat (a shared title lands on several ranks), one image is
    reused by two samples, and class "rare" is carried by one sample only."""
    titles = ["cute cat compilation", "minecraft speedrun", "cute cat compilation", "lofi beats to study"]
    categories = ["Pets", "Gaming", "Music"]
    out = []
    for i in range(count):
        out.append(
            dict(
                key=f"{i:05d}",
                image=b"not a jpeg" if i in broken else (3 if i == 7 else i),  # 7 reuses image 3
                title=f"{titles[i % len(titles)]}" if i % 3 else f"video {i} {titles[i % len(titles)]}",
                category="rare" if i == count - 1 else categories[i % len(categories)],
            )
        )
    return out


def _reference(samples: list[dict]) -> dict[str, float]:
    """float64, sample by sample, in one process over the whole readable set."""
    words, images = _word_vectors(), _image_vectors(32)
    images = images / np.linalg.norm(images, axis=1, keepdims=True)

    def text(t: str) -> np.ndarray:
        ids = _tokenize([t])["input_ids"][0]
        v = words[[int(i) for i in ids if i]].mean(0)
        return v / np.linalg.norm(v)

    kept = [s for s in samples if not isinstance(s["image"], bytes)]
    img = np.stack([images[s["image"]] for s in kept])
    txt = np.stack([text(s["title"]) for s in kept])
    same_image = [[a["image"] == b["image"] for b in kept] for a in kept]
    tokens = [tuple(_tokenize([s["title"]])["input_ids"][0].tolist()) for s in kept]
    same_caption = [[a == b for b in tokens] for a in tokens]
    n = len(kept)
    metrics = {"eval/num_samples": float(n)}
    for name, q, k, q_same, k_same in (
        ("i2t", img, txt, same_image, same_caption),
        ("t2i", txt, img, same_caption, same_image),
    ):
        sim = q @ k.T
        ranks = []
        for i in range(n):
            right = [j for j in range(n) if any(q_same[i][m] and k_same[m][j] for m in range(n))]
            best = max(sim[i, j] for j in right)
            ranks.append(sum(1 for j in range(n) if j not in right and sim[i, j] >= best))
        for kk in (1, 5, 10):
            metrics[f"eval/{name}_r{kk}"] = sum(r < kk for r in ranks) / n
    classes = sorted({s["category"] for s in samples})  # every sample's, as the class list reads them
    emb = []
    for c in classes:
        v = np.mean([text(t.format(c)) for t in TEMPLATES], axis=0)
        emb.append(v / np.linalg.norm(v))
    scores = img @ np.stack(emb).T
    labels = [{s2["category"] for s2 in kept if s2["image"] == s["image"]} for s in kept]
    hits = 0
    for i in range(n):
        right = [classes.index(c) for c in labels[i]]
        best = max(scores[i, j] for j in right)
        hits += all(best > scores[i, j] for j in range(len(classes)) if j not in right)
    metrics["eval/zeroshot_top1"] = hits / n
    metrics["eval/zeroshot_samples"] = float(n)
    metrics["eval/zeroshot_classes"] = float(len(classes))
    metrics["eval/zeroshot_chance"] = sum(len(x) for x in labels) / (n * len(classes))
    return metrics


def _eval_rank(rank: int, world_size: int, val_shards: str, batch_size: int, stop_rank: int | None):
    from vutrain.data.val import ValStream, collect_label_values
    from vutrain.evaluate import EvalInterrupted, evaluate, read_on_first_rank

    stream = ValStream(
        val_shards, preprocess=_preprocess, tokenize=_tokenize, batch_size=batch_size, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    engine = _Engine(32)
    classes = read_on_first_rank(lambda: collect_label_values(val_shards), "cpu")
    dummy = dict(_tokenize([""]), pixel_values=torch.zeros(1, 3, 2, 2), labels=[""], label_sets=[[]])
    asked = []

    def stop_requested():
        asked.append(1)
        return rank == stop_rank and len(asked) == 2

    try:
        metrics = evaluate(
            engine, stream, classes, TEMPLATES, _tokenize, torch.float32, "cpu", dummy,
            stop_requested=stop_requested,
        )  # fmt: skip
    except EvalInterrupted:
        return {"interrupted_after_forwards": engine.forwards}
    return dict(metrics, skipped=sum(stream.skipped().values()))


def _shard_layout(tmp_path, sizes: list[int], broken: set[int]) -> tuple[str, list[dict]]:
    samples = _samples(sum(sizes), broken)
    paths, start = [], 0
    for n, size in enumerate(sizes):
        paths.append(_write_shard(tmp_path / f"{n:05d}.tar", samples[start : start + size]))
        start += size
    return "::".join(paths), samples


def _assert_matches_reference(results: list[dict], samples: list[dict], broken: set[int]) -> None:
    for r in results[1:]:
        assert {k: v for k, v in r.items() if k != "skipped"} == {
            k: v for k, v in results[0].items() if k != "skipped"
        }
    expected = _reference(samples)
    got = {k: results[0][k] for k in expected}
    assert got == pytest.approx(expected, abs=1e-6)
    assert sum(r["skipped"] for r in results) == len(broken)


@pytest.mark.parametrize(
    "world_size, sizes, batch_size",
    [
        (3, [0, 1, 9], 4),  # rank 0 reads nothing, rank 1 one sample, rank 2 nine in batches of 4
        (2, [1], 3),  # fewer samples than ranks
        (3, [5, 6], 2),  # fewer shards than ranks: samples dealt by index, 11 over 3 ranks
    ],
)
def test_metrics_on_uneven_ranks_equal_a_float64_reference_over_the_whole_set(
    tmp_path, world_size, sizes, batch_size
):
    broken = {8} if sum(sizes) > 8 else set()  # on one rank's share only
    spec, samples = _shard_layout(tmp_path, sizes, broken)
    results = run_distributed(_eval_rank, world_size, spec, batch_size, None)
    _assert_matches_reference(results, samples, broken)


def test_a_preemption_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path):
    spec, _ = _shard_layout(tmp_path, [0, 1, 9], set())
    results = run_distributed(_eval_rank, 3, spec, 2, 1, timeout_s=60)
    # every rank made exactly one forward (its first batch or the dummy), then stopped together
    assert results == [{"interrupted_after_forwards": 1}] * 3
