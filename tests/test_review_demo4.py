"""Review tests: the demo refuses, before it writes anything, a --num-samples below one global batch
of its ranks and a `data.train_shards=` override (it trains on the shards it writes)."""

import pytest

from vutrain import demo


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of the demo."""
    code = demo.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.err.strip().splitlines()


def _blocked_out(tmp_path) -> str:
    """An --out under a file: a demo whose checks pass stops there with "error: --out ...", so
    an accepted command line is told from a refused one without writing data or training."""
    blocker = tmp_path / "a_file"
    blocker.write_text("stops the demo at --out, after its argument checks\n")
    return str(blocker / "out")


@pytest.mark.parametrize(
    ("user", "smallest"),
    [([], 128), (["train.micro_batch_size=48"], 96), (["--ranks", "3", "data.num_workers=0"], 192)],
)
def test_num_samples_below_one_global_batch_is_refused_before_anything_is_written(
    tmp_path, capsys, user, smallest
):
    """`--num-samples 64` on 2 CPU ranks wrote the shards, started the launcher and both ranks, then
    failed on "data.num_samples=64 is smaller than one global batch", a key the demo's user never
    set. Now one line naming --num-samples and the smallest value for the ranks and batch."""
    out = tmp_path / "out"
    argv = ["--out", str(out), "--device", "cpu", "--num-samples", "64", "--shard-size", "16", *user]
    code, err = _run(argv, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: --num-samples 64 is smaller than one global batch"), err
    assert f"pass --num-samples {smallest} or more" in err[0], err
    assert not out.exists()
    accepted = ["--out", _blocked_out(tmp_path), "--device", "cpu", "--num-samples", str(smallest)]
    code, err = _run([*accepted, "--shard-size", "16", *user], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: --out"), err


def test_a_data_num_samples_override_below_one_global_batch_names_that_key(tmp_path, capsys):
    """A user's data.num_samples is the epoch the run reads: the line names it, not --num-samples."""
    out = tmp_path / "out"
    code, err = _run(["--out", str(out), "--device", "cpu", "data.num_samples=100"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: data.num_samples=100 is smaller than one global batch"), err
    assert "pass data.num_samples=128 or more" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("override", ["data.train_shards={other}", " data.train_shards = {other}"])
def test_a_train_shards_override_is_refused_before_anything_is_written(tmp_path, capsys, override):
    """`data.train_shards=X` trained on X while the demo printed that it wrote and trained on its
    synthetic shards, and reported their top-1 as the demo's. Now one line, nothing written."""
    out, other = tmp_path / "out", tmp_path / "mine" / "{00000..00003}.tar"
    item = override.format(other=other)
    code, err = _run(["--out", str(out), "--device", "cpu", "--num-samples", "128", item], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {item!r}: the demo sets data.train_shards itself"), err
    assert "--num-samples" in err[0] and "vutrain/train.py" in err[0], err
    assert not out.exists()


def test_a_val_shards_override_is_still_accepted(tmp_path, capsys):
    """data.val_shards= (no held-out evaluation) stays the user's to set."""
    small = ["--device", "cpu", "--num-samples", "128", "--shard-size", "64"]
    argv = ["--out", _blocked_out(tmp_path), *small, "data.val_shards="]
    code, err = _run(argv, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: --out"), err
