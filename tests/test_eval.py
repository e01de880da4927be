"""Evaluation (`vutrain.evaluate`): retrieval recall, and a periodic eval over ranks that hold
different numbers of validation batches."""

from __future__ import annotations

import pytest
import torch

from vutrain.evaluate import recall_at_k

from helpers_dist import run_distributed


def test_recall_counts_ties_against_the_pair():
    """Before, a column that only tied the true pair did not count: a collapsed model (every
    embedding equal) scored R@1 = 1.0."""
    collapsed = torch.zeros(4, 4)
    assert recall_at_k(collapsed, ks=(1, 4)) == pytest.approx({1: 0.0, 4: 1.0})
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.1], [0.5, 0.5, 0.7]])
    # row 0 ties column 1 (rank 1), row 1 is first (rank 0), row 2 is first (rank 0)
    assert recall_at_k(sim, ks=(1, 2)) == pytest.approx({1: 2 / 3, 2: 1.0})


class _Engine(torch.nn.Module):
    """DeepSpeed's engine as evaluate() sees it: `.module`, a forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def _uneven_eval(rank: int, world_size: int, val_shards: str, tok_dir: str) -> dict:
    from transformers import AutoTokenizer

    from vutrain.config import ModelConfig, RunConfig
    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.tokenizer import make_tokenize
    from vutrain.evaluate import Evaluator
    from vutrain.model import build_model, preset_image_processor

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    engine = _Engine(build_model(ModelConfig(preset="tiny"), tokenizer))
    cfg = RunConfig()
    cfg.data.val_shards = val_shards
    cfg.eval.batch_size = 2
    processor = preset_image_processor(64)
    evaluator = Evaluator(
        cfg,
        rank,
        world_size,
        make_preprocess(processor),
        make_tokenize(tokenizer, 32),
        processor,
        torch.float32,
        torch.device("cpu"),
    )
    return evaluator(engine)


@pytest.mark.slow
def test_eval_runs_when_ranks_hold_different_numbers_of_batches(tmp_path):
    """9 samples over 2 ranks in batches of 2: rank 0 gets 3 batches, rank 1 two, and pads with a
    dummy batch. The dummy was 224 x 224 whatever the model (transformers 5's processor gives a
    SizeDict, not a dict), so the 64-px tiny model raised "Input image size (224*224) doesn't
    match model (64*64)" on rank 1 at the first eval."""
    from vutrain.data.synthetic import write_synthetic
    from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer

    info = write_synthetic(str(tmp_path / "data"), num_samples=24, shard_size=24, val_samples=9, seed=0)
    tok_dir = str(tmp_path / "tok")
    train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), tok_dir, vocab_size=300)
    metrics = run_distributed(_uneven_eval, 2, info["val_shards"], tok_dir)
    assert metrics[0] == metrics[1]
    assert metrics[0]["eval/num_samples"] == 9


class _StaticOutputEngine(torch.nn.Module):
    """An engine whose every call returns the same output tensors, overwritten in place: what a
    model under CUDA graphs (train.compile_scope=model, reduce-overhead) returns without grad.
    Features: one-hot rows picked by each sample's first pixel, so every pair is found at rank 1."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": dim})})()
        self.dim, self.img, self.txt = dim, None, None

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        if pixel_values is not None:
            img = torch.nn.functional.one_hot(pixel_values[:, 0, 0, 0].long(), self.dim).float()
            self.img = img if self.img is None or self.img.shape != img.shape else self.img.copy_(img)
        txt = torch.nn.functional.one_hot(input_ids[:, 0], self.dim).float()
        self.txt = txt if self.txt is None or self.txt.shape != txt.shape else self.txt.copy_(txt)
        return self.img, self.txt, None, None


def test_eval_keeps_its_own_copy_of_each_batch_s_features():
    """evaluate() kept the engine's output tensors per batch: with outputs in static memory every
    entry became the last batch's features, and recall fell from 1.0 to 0.5 here."""
    from vutrain.evaluate import evaluate

    def batch(ids):
        n = len(ids)
        pixels = torch.tensor(ids, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
        ids_t = torch.tensor(ids).view(n, 1)
        return dict(
            pixel_values=pixels, input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=["x"] * n
        )

    engine = _StaticOutputEngine()
    metrics = evaluate(engine, [batch([0, 1]), batch([2, 3])], [], [], None, torch.float32, "cpu", {})
    assert metrics["eval/num_samples"] == 4
    assert metrics["eval/i2t_r1"] == 1.0 and metrics["eval/t2i_r1"] == 1.0


def _one_hot_batch(ids):
    n = len(ids)
    pixels = torch.tensor(ids, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    ids_t = torch.tensor(ids).view(n, 1)
    return dict(pixel_values=pixels, input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=["x"] * n)


def test_retrieval_eval_never_holds_the_n_by_n_similarities(monkeypatch):
    """evaluate() made the whole [N, N] similarity matrix: 10 GB at 50k held-out samples, on the
    GPU beside the model. It scores a chunk of rows at a time now (8 rows here): no tensor made
    during the eval has N x N similarities, or N rows of N columns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vutrain import evaluate as evaluate_mod

    class Shapes(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Shapes.seen.add(tuple(t.shape))
            return out

    n = 48
    monkeypatch.setattr(evaluate_mod, "RECALL_CHUNK_ELEMENTS", 8 * n, raising=False)
    batches = [_one_hot_batch(list(range(i, i + 16))) for i in range(0, n, 16)]
    with Shapes():
        metrics = evaluate_mod.evaluate(
            _StaticOutputEngine(dim=64), batches, [], [], None, torch.float32, "cpu", {}
        )
    assert metrics["eval/num_samples"] == n
    assert metrics["eval/i2t_r1"] == 1.0 and metrics["eval/t2i_r1"] == 1.0
    assert (8, n) in Shapes.seen and (n, n) not in Shapes.seen  # before: the [48, 48] matrix


def test_recall_from_features_in_chunks_matches_the_whole_matrix(monkeypatch):
    from vutrain import evaluate as evaluate_mod

    torch.manual_seed(0)
    img, txt = torch.randn(37, 4), torch.randn(37, 4)
    txt[5] = float("nan")  # a NaN pair and a NaN column
    img[:3] = img[3]  # ties
    groups = torch.tensor([i // 2 for i in range(37)])  # pairs of identical captions
    whole_i2t = evaluate_mod.recall_at_k(img @ txt.T, ks=(1, 5, 10), groups=groups)
    whole_t2i = evaluate_mod.recall_at_k(txt @ img.T, ks=(1, 5, 10), groups=groups)
    monkeypatch.setattr(evaluate_mod, "RECALL_CHUNK_ELEMENTS", 5 * 37)  # chunks of 5 rows, one of 2
    assert evaluate_mod.feature_recall_at_k(img, txt, ks=(1, 5, 10), groups=groups) == whole_i2t
    assert evaluate_mod.feature_recall_at_k(txt, img, ks=(1, 5, 10), groups=groups) == whole_t2i
    assert evaluate_mod.recall_at_k(img @ txt.T, ks=(1, 5, 10), groups=groups) == whole_i2t


def test_zero_shot_scores_list_fields_and_keeps_unlabelled_samples_for_retrieval():
    """A list-valued zero-shot field (tags) made one class per element but labelled each sample
    with the elements joined by ", ": no sample matched a class and zero-shot top-1 went missing
    without a word. A sample whose top class is any of its labels is a hit now; a sample without
    the field was skipped by the validation stream (out of retrieval too) and is now only left
    out of zero-shot."""
    from vutrain.evaluate import evaluate

    classes = ["a", "b", "c"]

    def tokenize(texts):
        ids = torch.tensor([[classes.index(t) if t in classes else 7] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    pixels = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    batch = dict(
        input_ids=torch.tensor([[0], [1], [2], [3]]),
        attention_mask=torch.ones(4, 1, dtype=torch.long),
        pixel_values=pixels,
        labels=["a", "b, c", "", "b"],
        label_sets=[["a"], ["b", "c"], [], ["b"]],
    )
    metrics = evaluate(_StaticOutputEngine(), [batch], classes, ["{}"], tokenize, torch.float32, "cpu", {})
    assert metrics["eval/num_samples"] == 4
    assert metrics["eval/zeroshot_samples"] == 3  # the unlabelled sample is left out
    assert metrics["eval/zeroshot_top1"] == pytest.approx(2 / 3)  # a: hit, {b, c}: hit, b: miss


def _write_val_shard(path: str, metas: dict[str, dict]) -> str:
    """A validation tar: per key an 8x8 JPEG and `metas[key]` as its json."""
    import io
    import json
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "JPEG")
    with tarfile.open(path, "w") as tar:
        for key, meta in metas.items():
            for ext, payload in (("jpg", buf.getvalue()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _zero_tokenize(texts):
    return {
        "input_ids": torch.zeros(len(texts), 2, dtype=torch.long),
        "attention_mask": torch.ones(len(texts), 2),
    }


def test_validation_stream_keeps_samples_without_the_label(tmp_path):
    from vutrain.data.val import ValStream, collect_label_values

    # Tags kept as one comma-separated string (s3) are several classes, as training and the tag
    # metrics read them; they were one class, "cat, fish".
    metas = {
        "s0": {"title": "x", "tags": ["cat", "dog"]},
        "s1": {"title": "y", "tags": "bird"},
        "s2": {"title": "z"},
        "s3": {"title": "w", "tags": "cat, fish,"},
    }
    _write_val_shard(tmp_path / "val.tar", metas)
    stream = ValStream(
        str(tmp_path / "val.tar"),
        preprocess=lambda image: torch.zeros(3, 4, 4),
        tokenize=_zero_tokenize,
        batch_size=8,
        label_field="tags",
    )
    (batch,) = list(stream)
    assert batch["keys"] == ["s0", "s1", "s2", "s3"] and stream.skipped() == {}
    assert batch["label_sets"] == [["cat", "dog"], ["bird"], [], ["cat", "fish"]]
    assert collect_label_values(str(tmp_path / "val.tar"), "tags") == ["bird", "cat", "dog", "fish"]


def test_tags_kept_as_one_string_give_tag_metrics_as_in_training(tmp_path):
    """Training's tag positives split a `tags` string at commas; the validation stream dropped it,
    so a dataset with string tags trained on tags and reported no tag metrics at all."""
    from vutrain.data.labels import tag_id, tag_values
    from vutrain.data.val import ValStream

    metas = {
        "s0": {"title": "x", "tags": ["cat", "dog", ""]},
        "s1": {"title": "y", "tags": "bird, fish,"},
        "s2": {"title": "z", "tags": None},
    }
    stream = ValStream(
        _write_val_shard(tmp_path / "val.tar", metas),
        preprocess=lambda image: torch.zeros(3, 4, 4),
        tokenize=_zero_tokenize,
        batch_size=8,
    )
    (batch,) = list(stream)
    assert batch["tags"] == [["cat", "dog"], ["bird", " fish"], []]
    # the same tags training's positives see (tag_id strips and lower-cases)
    assert {tag_id(t) for t in tag_values(metas["s1"]["tags"])} == {tag_id("bird"), tag_id("fish")}


def test_recall_counts_nan_against_the_model():
    """A diverged model's NaN similarities scored recall 1.0 at every k (NaN >= NaN is False: no
    column beat any pair). A NaN pair is a miss; a NaN column beats every pair."""
    nan = float("nan")
    assert recall_at_k(torch.full((4, 4), nan), ks=(1, 3)) == pytest.approx({1: 0.0, 3: 0.0})
    sim = torch.eye(3)
    sim[:, 2] = nan  # text 2 is NaN: its pair misses, and it outranks the other pairs
    assert recall_at_k(sim, ks=(1, 2)) == pytest.approx({1: 0.0, 2: 2 / 3})


def test_zero_shot_nan_scores_are_misses():
    """argmax over NaN scores picks a NaN's index: a NaN model hit whenever that class was right."""
    from vutrain.evaluate import evaluate

    class NanEngine(_StaticOutputEngine):
        def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
            img, txt, scale, bias = super().forward(pixel_values, input_ids, attention_mask)
            return (None if img is None else img * float("nan")), txt, scale, bias

    def tokenize(texts):
        ids = torch.tensor([[["a", "b"].index(t) if t in "ab" else 7] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    pixels = torch.zeros(2, 3, 2, 2)
    batch = dict(
        input_ids=torch.tensor([[0], [1]]),
        attention_mask=torch.ones(2, 1, dtype=torch.long),
        pixel_values=pixels,
        labels=["a", "a"],
        label_sets=[["a"], ["a"]],
    )
    metrics = evaluate(NanEngine(), [batch], ["a", "b"], ["{}"], tokenize, torch.float32, "cpu", {})
    assert metrics["eval/zeroshot_top1"] == 0.0  # before: 1.0 (argmax of an all-NaN row is 0, "a")
    assert metrics["eval/i2t_r1"] == 0.0 and metrics["eval/t2i_r1"] == 0.0


def test_a_blank_label_is_no_class(tmp_path):
    """The dataset tools write `category_name: ""` for an unknown category: "" became a zero-shot
    class (prompts "a thumbnail of .", ...), those samples were scored against it, and the class
    count and chance were off by one. A blank value (or list element) is no label now."""
    from vutrain.data.val import ValStream, collect_label_values

    metas = {
        "s0": {"title": "x", "category_name": "Music", "tags": ["cat", ""]},
        "s1": {"title": "y", "category_name": "", "tags": [" "]},
        "s2": {"title": "z", "category_name": "Gaming", "tags": ["dog"]},
    }
    shard = _write_val_shard(tmp_path / "val.tar", metas)
    assert collect_label_values(shard) == ["Gaming", "Music"]
    assert collect_label_values(shard, "tags") == ["cat", "dog"]
    for field, label_sets in (
        ("category_name", [["Music"], [], ["Gaming"]]),
        ("tags", [["cat"], [], ["dog"]]),
    ):
        stream = ValStream(
            shard,
            preprocess=lambda image: torch.zeros(3, 4, 4),
            tokenize=_zero_tokenize,
            batch_size=8,
            label_field=field,
        )
        (batch,) = list(stream)
        assert batch["keys"] == ["s0", "s1", "s2"]  # the unlabelled sample still counts for retrieval
        assert batch["label_sets"] == label_sets


def test_a_template_that_cannot_take_the_class_name_stops_the_run_before_training(tiny_shards, tmp_path):
    """Only "'{}' somewhere in eval.templates" was checked: a template with another field trained
    eval.every steps, then died at the first eval with a KeyError traceback."""
    import train_runner as tr

    run_dir = str(tmp_path / "run")
    overrides = tr.base_overrides(
        tiny_shards, run_dir, 2, eval__every=1, eval__templates="a thumbnail of {}.,a photo of {name}."
    )
    proc = tr.run("python", overrides)
    assert proc.returncode == 2, tr.describe(proc)
    assert "config error: eval.templates: 'a photo of {name}.'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any("train/loss" in row for row in tr.metrics(run_dir))  # not one step trained


def test_a_template_without_the_class_name_is_refused():
    """A comma inside a template splits it on the command line: "a thumbnail of {}, in HD." gave
    a template "in HD." that every class shared, mixed silently into each class embedding."""
    from vutrain.config import ConfigError, check_templates

    check_templates(["a thumbnail of {}.", "{0} ({0})", "{{{}}}"])
    with pytest.raises(ConfigError, match="'in HD.' has no '{}'"):
        check_templates(["a thumbnail of {}", "in HD."])
    with pytest.raises(ConfigError, match="'{} or {}' must take the class name"):
        check_templates(["{} or {}"])
    with pytest.raises(ConfigError, match="eval.templates is empty"):
        check_templates([])
