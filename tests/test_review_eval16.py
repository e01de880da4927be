"""Eval decoded every validation image in the training process, one after the other, whatever
data.num_workers said (a 50k-sample eval decode-bound on the CPU while the GPU idled). ValStream now
decodes in data.num_workers (>= 2) DataLoader workers, each reading whole shards of its rank, and
yields the samples and skip counts of the in-process pass (in another order)."""

from __future__ import annotations

import io
import os
import sys
import tarfile

import pytest
import torch
from tiny_eval import tiny_engine, tiny_evaluator, train_tokenizer

from vutrain.data.val import ValStream

_TRACE = {"fd": None}  # while set: every process of the pass appends "pid path" per tar it opens


def _trace_tar_opens(event, args):
    if event == "open" and _TRACE["fd"] is not None and str(args[0]).endswith(".tar"):
        os.write(_TRACE["fd"], f"{os.getpid()} {os.path.basename(str(args[0]))}\n".encode())


sys.addaudithook(_trace_tar_opens)  # inherited by forked workers; idle unless a test sets the fd


def _tokenize(captions):
    ids = torch.tensor([[len(c), sum(map(ord, c)) % 1000] for c in captions], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _damage(shards: list[str]) -> None:
    """Shard 0: a sample with a second image (an ignored member); shard 1: an undecodable JPEG;
    shard 2: cut in the middle (a tar error, the samples before it kept); shard 3 intact."""
    with tarfile.open(shards[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shards[0], "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
            if member.name.endswith(".jpg") and member.name.startswith(members[0][0].name.split(".")[0]):
                extra = tarfile.TarInfo(member.name[:-4] + ".png")
                extra.size = len(payload)
                tar.addfile(extra, io.BytesIO(payload))
    with tarfile.open(shards[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg") and i > len(members) // 2)
    with tarfile.open(shards[1], "w") as tar:
        for i, (member, payload) in enumerate(members):
            payload = b"not a jpeg" if i == bad else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    with open(shards[2], "rb") as f:
        data = f.read()
    with open(shards[2], "wb") as f:
        f.write(data[: len(data) // 2 + 100])


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    from vutrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("eval16")
    write_synthetic(str(out), num_samples=160, shard_size=40, val_samples=0, seed=0)
    shards = sorted(str(p) for p in (out / "train").glob("*.tar"))
    assert len(shards) == 4
    _damage(shards)
    return "::".join(shards)


def _stream(spec: str, preprocess, workers: int, rank: int = 0, world_size: int = 1) -> ValStream:
    return ValStream(
        spec,
        preprocess=preprocess,
        tokenize=_tokenize,
        batch_size=7,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
    )


def _pid_pixels(image):
    return torch.full((3, 2, 2), float(os.getpid()), dtype=torch.float64)


def _by_key(batches: list[dict]) -> dict:
    """Per sample key, everything the batch holds of it (pixels as exact bytes)."""
    out = {}
    for b in batches:
        for i, key in enumerate(b["keys"]):
            assert key not in out
            out[key] = (
                b["pixel_values"][i].numpy().tobytes(),
                b["input_ids"][i].tolist(),
                b["attention_mask"][i].tolist(),
                b["labels"][i],
                b["label_sets"][i],
                b["tags"][i],
                b["image_ids"][i],
            )
    return out


def test_workers_decode_and_each_reads_only_its_shards(val_set, tmp_path):
    """Before: ValStream had no num_workers; every image was decoded by the calling process. Now two
    workers decode, each opening whole shards that no other process of the pass opens."""
    stream = _stream(val_set, _pid_pixels, workers=2)
    trace = tmp_path / "opens"
    _TRACE["fd"] = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        batches = list(stream)
    finally:
        os.close(_TRACE["fd"])
        _TRACE["fd"] = None
    pids = {int(v) for b in batches for v in b["pixel_values"][:, 0, 0, 0].tolist()}
    assert os.getpid() not in pids and len(pids) == 2
    opens = [line.split() for line in trace.read_text().splitlines()]
    opened_by = {}
    for pid, shard in opens:
        opened_by.setdefault(shard, set()).add(int(pid))
    assert len(opens) == len(opened_by) == 4, opens  # every shard opened once, by one process
    assert set().union(*opened_by.values()) == pids  # by the decoding workers, not this process


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])  # 3: ranks of 2, 1, 1 shards; 5: every rank reads all
def test_workers_give_the_in_process_samples_and_skip_counts(val_set, world_size):
    """With CLIP-exact preprocessing, 2 workers give per sample key the very pixels (bit for bit),
    token ids, labels, tags and image id of the in-process pass, the same batch sizes (all full but
    the last) and the same skip counts (a bad image, a tar error, an ignored member: each counted
    once); only the order of the samples may differ. A rank with fewer than 2 shards, and every rank
    when they outnumber the shards, reads in-process."""
    from vutrain.data.preprocess import make_preprocess
    from vutrain.model import preset_image_processor

    preprocess = make_preprocess(preset_image_processor(32))
    keys = []
    for rank in range(world_size):
        ref_stream, stream = (
            _stream(val_set, preprocess, 0, rank, world_size),
            _stream(val_set, preprocess, 2, rank, world_size),
        )
        ref, batches = list(ref_stream), list(stream)
        assert stream.loader_workers() == (2 if world_size <= 2 or (world_size == 3 and rank == 0) else 0)
        assert _by_key(batches) == _by_key(ref), rank
        assert [len(b["keys"]) for b in batches] == [len(b["keys"]) for b in ref]
        assert stream.skipped() == ref_stream.skipped(), rank
        keys += list(_by_key(ref))
    assert len(keys) == len(set(keys)) > 100  # each sample read by exactly one rank
    if world_size == 1:
        skipped = ref_stream.skipped()
        assert {"tar_error", "ignored_member"} <= set(skipped) and sum(skipped.values()) >= 3


def test_workers_end_with_the_pass(val_set):
    """No loader worker outlives a pass: one read to the end, or one left after its first batch (an
    interrupted eval)."""
    import multiprocessing

    stream = _stream(val_set, _pid_pixels, workers=2)
    assert len(list(stream)) > 1 and not multiprocessing.active_children()
    batches = iter(stream)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert not multiprocessing.active_children()


def test_one_worker_and_auto_read_in_process(val_set):
    """data.num_workers 0 and 1 (the tiny preset) fork nothing: the eval reads in-process. (-1, auto,
    resolves as training's does since test_review_eval18: it forks on a machine of 3 or more cores.)"""
    for workers in (0, 1):
        stream = _stream(val_set, _pid_pixels, workers)
        pids = {int(v) for b in stream for v in b["pixel_values"][:, 0, 0, 0].tolist()}
        assert stream.loader_workers() == 0 and pids == {os.getpid()}


def test_evaluator_uses_data_num_workers(val_set, single_process, tmp_path):
    """Evaluator with data.num_workers=2 decodes outside this process and gives the metrics of 0.
    Bit-identical: eval/num_samples, eval/skipped_samples and the zero-shot counts. Every metric is
    order-independent (the features are gathered and scored as a set; ties count against the model
    whatever their order), but a sample's features come from a forward over another batch, so the
    float metrics are compared to a tolerance."""
    from vutrain.data.preprocess import make_preprocess
    from vutrain.model import preset_image_processor

    engine, tokenizer = tiny_engine(train_tokenizer(val_set.split("::")[3], str(tmp_path / "tok")))
    exact = make_preprocess(preset_image_processor(64))
    pids = tmp_path / "pids"
    pids.mkdir()

    def preprocess(image):
        (pids / str(os.getpid())).touch()
        return exact(image)

    results = []
    for workers in (0, 2):
        evaluator = tiny_evaluator(
            val_set,
            tokenizer,
            preprocess=preprocess,
            data__num_workers=workers,
            eval__batch_size=8,
            eval__tag_vocab_size=50,
        )
        results.append(evaluator(engine))
        if workers == 0:
            assert [int(p.name) for p in pids.iterdir()] == [os.getpid()]
    in_process, workers = results
    exact_keys = [
        "eval/num_samples",
        "eval/skipped_samples",
        "eval/zeroshot_samples",
        "eval/zeroshot_classes",
    ]
    assert {k: workers[k] for k in exact_keys} == {k: in_process[k] for k in exact_keys}
    assert workers == pytest.approx(in_process, rel=1e-5, abs=1e-6)
    assert in_process["eval/skipped_samples"] >= 2 and in_process["eval/num_samples"] > 100
    assert "eval/i2t_r1" in in_process and "eval/tags_map" in in_process
    assert len({int(p.name) for p in pids.iterdir()} - {os.getpid()}) == 2
