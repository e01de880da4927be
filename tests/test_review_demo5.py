"""Review tests: a second demo into the same --out says that it starts fresh and replaces the
earlier run (it deleted a run of minutes and its exported model without a word); the training
command the demo prints reads back in bash as the arguments it ran (real deepspeed launcher)."""

import subprocess

from vutrain import demo


def _earlier_demo_out(tmp_path, *folders: str):
    """A folder an earlier demo claimed, holding ``folders``, and a file named data/ that stops the
    next demo at its first write, after it has said what it replaces and before it trains."""
    out = tmp_path / "demo_out"
    out.mkdir()
    demo.claim_output(str(out))
    for name in folders:
        (out / name).mkdir()
        (out / name / "kept_until_replaced").write_text("an earlier run's file\n")
    (out / "data").write_text("not a folder: the shards cannot be written\n")
    return out


def _demo(out, capsys) -> tuple[int, str, str]:
    code = demo.main(["--out", str(out), "--device", "cpu", "--steps", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_second_demo_says_it_replaces_the_earlier_run_and_model(tmp_path, capsys):
    out = _earlier_demo_out(tmp_path, "run", "hf_model")
    code, stdout, err = _demo(out, capsys)
    assert code == 1 and err.startswith(f"error: cannot write the synthetic shards to {out}/data"), err
    notes = [line for line in stdout.splitlines() if "earlier demo" in line]
    assert notes == [
        f"{out} holds an earlier demo's run/ and hf_model/: the demo does not resume, this run starts "
        "fresh and replaces them (to keep a run, give each run its own --out)"
    ], stdout
    assert stdout.index(notes[0]) < stdout.index("[1/5]")  # said before anything is replaced


def test_a_demo_folder_without_an_earlier_run_gets_no_such_line(tmp_path, capsys):
    out = _earlier_demo_out(tmp_path)
    code, stdout, err = _demo(out, capsys)
    assert code == 1 and "cannot write the synthetic shards" in err, err
    assert "earlier demo" not in stdout and "[1/5]" in stdout, stdout


def test_the_printed_training_command_pastes_into_bash_as_the_run_it_started(tmp_path, capsys):
    """The `$ deepspeed ... train.py ...` line was joined unquoted: pasted into bash, the shard spec
    data.train_shards=.../{00000..00001}.tar became one override per shard, the last of which won
    (a run on one shard, without a word). Now bash reads back the arguments the demo passed."""
    out = tmp_path / "out"
    caption = "data.caption_template=it's {title} = a title"  # a space, a quote, an equals sign
    small = ["--num-samples", "64", "--val-samples", "24", "--shard-size", "32", "--steps", "1"]
    quick = ["--ranks", "1", "--device", "cpu", "train.micro_batch_size=8", "data.num_workers=0"]
    # An unknown key: the run stops in its config check, seconds after the launcher printed it.
    code = demo.main(["--out", str(out), *small, *quick, caption, "train.no_such_key=1"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert code == 1 and len(printed) == 1, printed
    pasted = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + printed[0][2:]], capture_output=True, text=True, timeout=60
    )
    args = pasted.stdout.split("\0")[:-1]
    assert pasted.returncode == 0, pasted.stderr
    assert [a for a in args if a.startswith("data.train_shards=")] == [
        f"data.train_shards={out}/data/train/{{00000..00001}}.tar"
    ], args
    assert caption in args and args[-1] == "train.no_such_key=1", args
