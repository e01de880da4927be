"""TrainStream / ValStream on real JPEG shards: exact resume, rank splits, bad-sample counting."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data import TrainStream, ValStream, collect_label_values, make_preprocess
from vutrain.data.device_transform import make_device_transform
from vutrain.data.epoch_plan import worker_shards
from vutrain.data.preprocess import make_fast_preprocess, normalisation
from vutrain.data.synthetic import CLASSES, write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

IMAGE = 16
BAD_REASONS = {"undecodable_image": 1, "non_utf8_text": 1, "missing_image": 1, "bad_json": 1, "tar_error": 1}


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_bad_shards(directory, good_tar):
    """bad.tar: 2 good samples and 4 broken ones; cut.tar: a tar truncated mid-sample."""
    src = tarfile.open(good_tar)
    jpg, meta, txt = (src.extractfile(f"00000{i}").read() for i in ("00.jpg", "00.json", "00.txt"))
    samples = {
        "b0": {"jpg": jpg, "json": meta, "txt": txt},
        "b1": {"jpg": jpg[: len(jpg) // 2], "json": meta, "txt": txt},  # truncated JPEG
        "b2": {"jpg": jpg, "json": meta, "txt": b"caf\xe9 \xff"},  # not UTF-8
        "b3": {"json": meta, "txt": txt},  # no image
        "b4": {"jpg": jpg, "json": b"{not json", "txt": txt},
        "b5": {"jpg": jpg, "json": meta, "txt": txt},
    }
    with tarfile.open(directory / "bad.tar", "w") as tar:
        for key, members in samples.items():
            for ext, payload in sorted(members.items()):
                _add(tar, f"{key}.{ext}", payload)
    with tarfile.open(directory / "full.tar", "w") as tar:
        for key in ("c0", "c1"):
            for ext, payload in sorted(samples["b0"].items()):
                _add(tar, f"{key}.{ext}", payload)
    cut_at = tarfile.open(directory / "full.tar").getmember("c1.txt").offset_data + 2
    (directory / "cut.tar").write_bytes((directory / "full.tar").read_bytes()[:cut_at])  # inside c1.txt
    with open(directory / "sizes.json", "w") as f:
        json.dump({"bad.tar": 2, "cut.tar": 1}, f)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    info = write_synthetic(str(root / "syn"), 144, 24, image_size=IMAGE, seed=2, val_samples=40)
    bad = root / "bad"
    bad.mkdir()
    _write_bad_shards(bad, root / "syn" / "train" / "00000.tar")
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 500, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return {
        "info": info,
        "bad": bad,
        "tokenize": make_tokenize(tok, 16),
        "preprocess": make_preprocess(processor),
    }


def _train(data, spec=None, **kw):
    args = dict(batch_size=8, rank=1, world_size=2, num_workers=0, seed=7, shuffle_buffer=20)
    args.update(kw)
    return TrainStream(
        spec or data["info"]["train_shards"], preprocess=data["preprocess"], tokenize=data["tokenize"], **args
    )


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == {"pixel_values", "input_ids", "attention_mask"}
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_preprocess_matches_clip_image_processor():
    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    rng = np.random.default_rng(0)
    for h, w in [(24, 24), (50, 31), (20, 90)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ref = torch.as_tensor(processor(img, return_tensors="np")["pixel_values"][0])
        out = make_preprocess(processor)(img)
        assert out.shape == ref.shape == (3, 24, 24)
        assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "settings",
    [
        # SigLIP-style squash to exactly height x width (was read as a shortest edge, then cropped)
        dict(size={"height": 24, "width": 24}, crop_size={"height": 24, "width": 24}),
        dict(size={"height": 20, "width": 28}, do_center_crop=False),  # no crop (was cropped)
        dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_normalize=False),
        dict(size={"shortest_edge": 24}, crop_size={"height": 16, "width": 20}, do_rescale=False),
    ],
)
def test_preprocess_follows_the_processor_s_settings(settings):
    """Training, eval and the exported processor must see the same pixels: a pretrained model's
    processor that squashes, skips the crop, the normalisation or the rescale was followed only
    partly (max difference 2.4 in normalised units for the squash, a 32 x 32 crop where the
    processor gave 32 x 64)."""
    processor = CLIPImageProcessor(**settings)
    rng = np.random.default_rng(0)
    for h, w in [(24, 24), (50, 31), (20, 90)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ref = torch.as_tensor(processor(img, return_tensors="np")["pixel_values"][0])
        out = make_preprocess(processor)(img)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
        # The training workers' uint8 path, on a photo-like image (its stated tolerance is for
        # photos: on pixel noise torch's and PIL's bicubic part by up to 8 levels at edges).
        photo = photo_like(rng, w, h)
        ref = torch.as_tensor(processor(photo, return_tensors="np")["pixel_values"][0])
        fast = make_fast_preprocess(processor)(_png(photo))
        assert fast.shape == ref.shape and fast.dtype == torch.uint8
        mean, std, rescale = normalisation(processor)
        on_device = make_device_transform(processor)(fast[None], "cpu", torch.float32)[0]
        grey_levels = (on_device - ref).abs() * torch.tensor(std).view(3, 1, 1) / rescale
        # torch's antialiased uint8 bicubic against PIL's: within a level at one scale for both
        # axes (a shortest-edge resize); a squash scales the axes differently, and the two part
        # by a few levels at edges there (up to 7 seen; the DCT-scaled decode's bound is 12).
        uniform = "shortest_edge" in settings["size"]
        assert grey_levels.max().item() <= (1.01 if uniform else 8.0)
        assert grey_levels.mean().item() <= 0.5


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(size={"shortest_edge": 24}, do_center_crop=False), "do_center_crop=false"),
        (dict(size={"shortest_edge": 24, "longest_edge": 40}), "longest_edge"),
        (dict(size={"max_height": 24, "max_width": 24}), "max_height"),
        (dict(do_resize=False), "do_resize=false"),
    ],
)
def test_processor_settings_that_are_not_reproduced_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        make_preprocess(CLIPImageProcessor(**settings))
    with pytest.raises(ValueError, match=message):
        make_fast_preprocess(CLIPImageProcessor(**settings))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_batches_and_epoch_length(data):
    stream = _train(data)
    assert stream.steps_per_epoch == 144 // (8 * 2)  # num_samples from sizes.json
    batch = next(stream)
    assert (
        batch["pixel_values"].shape == (8, 3, IMAGE, IMAGE) and batch["pixel_values"].dtype == torch.float32
    )
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 16)
    assert batch["input_ids"].dtype == torch.long
    assert stream.batches_seen == 1 and stream.skipped() == {}
    assert _train(data, num_samples=64).steps_per_epoch == 4


@pytest.mark.parametrize("num_workers,k", [(0, 7), (2, 7), (2, 9)])
def test_resume_is_exact(data, num_workers, k):
    """2k batches straight == k batches, state_dict, fresh stream, load_state_dict, k batches.

    9 batches per epoch: k=7 resumes mid-epoch and crosses the boundary, k=9 resumes at it.
    """
    spec = f"{data['info']['train_shards']}::{data['bad']}/bad.tar::{data['bad']}/cut.tar"
    kw = dict(num_workers=num_workers, num_samples=144)
    straight = _train(data, spec, **kw)
    expected = [next(straight) for _ in range(2 * k)]
    first = _train(data, spec, **kw)
    _same([next(first) for _ in range(k)], expected[:k])
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = _train(data, spec, **kw)
    resumed.load_state_dict(state)
    _same([next(resumed) for _ in range(k)], expected[k:])
    assert resumed.skipped() == straight.skipped()
    assert resumed.epoch == straight.epoch == (2 * k) // 9


def test_resume_rejects_other_settings(data):
    stream = _train(data)
    next(stream)
    other = _train(data, rank=0)
    with pytest.raises(ValueError, match="rank: saved 1, now 0"):
        other.load_state_dict(stream.state_dict())


def test_resume_with_other_worker_count_names_the_setting(data):
    """A job moved to a node with other loader workers is told which setting to restore."""
    stream = _train(data, num_workers=2)
    with pytest.raises(ValueError, match=r"data.num_workers\): saved 2, now 3.*data.num_workers=2, or -1"):
        _train(data, num_workers=3).load_state_dict(stream.state_dict())


def test_shard_split_is_a_partition():
    shards = [f"s{i}" for i in range(10)]
    for epoch in range(2):
        parts = [worker_shards(shards, epoch, r, 2, w, 2, 3, True) for r in range(2) for w in range(2)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == sorted(shards) and min(map(len, parts)) >= 2
    assert worker_shards(shards, 0, 0, 2, 0, 2, 3, True) != worker_shards(shards, 1, 0, 2, 0, 2, 3, True)


def test_too_few_shards_and_unknown_size(data):
    spec = data["info"]["train_shards"]  # 6 shards
    with pytest.raises(ValueError, match=r"6 shards for 2 ranks x 4 workers: write more, smaller shards"):
        _train(data, spec, num_workers=4)
    with pytest.raises(ValueError, match=r"6 shards for 8 ranks x 1 workers"):
        _train(data, spec, world_size=8)
    stream = _train(data, spec, world_size=8, resampled=True)
    assert next(stream)["pixel_values"].shape[0] == 8
    # a directory without size files
    bare = data["bad"] / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "00000.tar").write_bytes((data["bad"] / "bad.tar").read_bytes())
    with pytest.raises(ValueError, match="data.num_samples is not set.*set data.num_samples"):
        _train(data, str(bare / "00000.tar"), world_size=1, rank=0)
    with pytest.raises(ValueError, match=r"unknown placeholder \{views\}"):
        _train(data, caption_template="{views}")


def test_bad_samples_are_skipped_and_counted(data):
    spec = f"{data['bad']}/bad.tar::{data['bad']}/cut.tar"
    val = ValStream(spec, preprocess=data["preprocess"], tokenize=data["tokenize"], batch_size=4)
    batches = list(val)
    assert [k for b in batches for k in b["keys"]] == ["b0", "b5", "c0"]  # cut.tar keeps c0, drops c1
    assert val.skipped() == BAD_REASONS
    stream = _train(data, spec, world_size=1, rank=0, batch_size=2, num_samples=6)
    for _ in range(4):
        assert next(stream)["pixel_values"].shape == (2, 3, IMAGE, IMAGE)
    assert set(stream.skipped()) == set(BAD_REASONS) and min(stream.skipped().values()) >= 1


@pytest.mark.parametrize("spec_key,world", [("val_shards", 2), ("train_shards", 4), ("val_shards", 3)])
def test_val_rank_split_disjoint_and_complete(data, spec_key, world):
    spec = data["info"][spec_key]  # val: 2 shards (fewer than 3 ranks -> split by sample), train: 6 shards
    keys = []
    for rank in range(world):
        for batch in ValStream(
            spec,
            preprocess=data["preprocess"],
            tokenize=data["tokenize"],
            batch_size=16,
            rank=rank,
            world_size=world,
        ):
            assert batch["pixel_values"].shape[0] == len(batch["labels"]) == len(batch["keys"])
            assert set(batch["labels"]) <= set(CLASSES)
            keys += batch["keys"]
    total = 40 if spec_key == "val_shards" else 144
    assert len(keys) == len(set(keys)) == total


def test_collect_label_values(data):
    values = collect_label_values(data["info"]["train_shards"], "category_name")
    assert values == sorted(values) and set(values) <= set(CLASSES) and len(values) > 12
    tags = collect_label_values(data["info"]["val_shards"], "tags")
    assert "red" in tags or "blue" in tags


def test_pipe_spec_reads_like_a_path(data):
    local = data["info"]["val_shards"].replace("{00000..00001}", "00001")
    assert collect_label_values(f"pipe:cat {local}") == collect_label_values(local)


def test_dry_split_restarts_from_its_shards(data):
    """One 24-sample shard, an epoch of 96 samples: the split is read 4 times, each pass reshuffled."""
    shard = data["info"]["train_shards"].replace("{00000..00005}", "00000")
    with _train(data, shard, world_size=1, rank=0, num_samples=96, shuffle_buffer=24) as stream:
        assert stream.steps_per_epoch == 12
        rows = [tuple(x.flatten().tolist()[:64]) for _ in range(12) for x in next(stream)["pixel_values"]]
    passes = [rows[i : i + 24] for i in range(0, 96, 24)]
    assert len(set(passes[0])) == 24
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and passes[1] != passes[0]
    assert stream.epoch == 1
