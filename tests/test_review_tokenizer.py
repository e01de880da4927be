"""Review tests: the BPE tokenizer, the synthetic data set, the demo (real files, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vutrain.config import build_config
from vutrain.data.synthetic import write_synthetic
from vutrain.model import tokenizer_and_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "vutrain", "configs", "tiny.yaml")

# Rank 0's tokenizer set-up in a child that is SIGKILLed halfway through writing tokenizer.json:
# transformers' writer is given half the file, then the process dies (a pre-emption, an OOM kill).
_KILLED_MID_SAVE = """
import os, signal, sys, tempfile
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from vutrain.config import build_config
from vutrain.model import tokenizer_and_processor


real_save = TokenizersBackend._save_pretrained

def save_then_die(self, save_directory, *args, **kwargs):
    whole = tempfile.mkdtemp()
    real_save(self, whole, *args, **kwargs)
    data = open(os.path.join(whole, "tokenizer.json"), "rb").read()
    with open(os.path.join(save_directory, "tokenizer.json"), "wb") as fh:
        fh.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

TokenizersBackend._save_pretrained = save_then_die
run_dir, shards, tiny = sys.argv[1:4]
cfg = build_config(tiny, []).model
tokenizer_and_processor(cfg, run_dir, shards, "{title}", 100, True, lambda: None)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return write_synthetic(str(out), num_samples=16, shard_size=8, image_size=16, val_samples=0)[
        "train_shards"
    ]


def test_tokenizer_killed_mid_save_is_retrained_on_restart(tmp_path, shards):
    """Rank 0 killed while saving the run's tokenizer: the restarted run (which reuses
    run/tokenizer/tokenizer.json when it exists) must get a working tokenizer, not a truncated
    file that fails to parse on every later start; no staging folder is left behind."""
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_MID_SAVE), run_dir, shards, TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr[-2000:]

    cfg = build_config(TINY, []).model
    tokenizer, _, context = tokenizer_and_processor(cfg, run_dir, shards, "{title}", 100, True, lambda: None)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=context)["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 1 and tokenizer.pad_token_id == 1
    assert sorted(os.listdir(os.path.join(run_dir, "tokenizer"))) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        ["--num-samples", "0"],
        ["--shard-size", "0"],
        ["--image-size", "4"],
        ["--seed", "-1"],
        ["--val-samples", "-3"],
    ],
)
def test_synthetic_cli_refuses_bad_counts_in_one_line(tmp_path, capsys, bad):
    """A bad count on the synthetic CLI: one argparse error naming the option, exit code 2, nothing
    written (0 samples, a tiny image or a negative seed were a traceback; a negative
    --val-samples silently wrote no val split and exited 0)."""
    from vutrain.data.synthetic import main

    argv = ["--out", str(tmp_path / "out"), "--num-samples", "4", "--shard-size", "2", "--image-size", "16"]
    with pytest.raises(SystemExit) as exc:
        main(argv + bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {bad[0]}: must be >=" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_synthetic_cli_out_is_a_file_one_line(tmp_path, capsys):
    """--out naming a file: one line naming --out, exit code 1 (was a NotADirectoryError traceback)."""
    from vutrain.data.synthetic import main

    target = tmp_path / "afile"
    target.write_text("mine\n")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(target), "--num-samples", "2", "--shard-size", "2", "--image-size", "16"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the shards under --out {target}") and err.count("\n") == 1
    assert target.read_text() == "mine\n"


def test_demo_second_run_replaces_the_previous_model_too(tmp_path):
    """A second demo run into its own folder replaces data/, run/ and hf_model/ (README): a run
    that fails in training must not leave the first run's hf_model/ beside its new data/."""
    from vutrain.demo import DEMO_MARKER, main

    out = tmp_path / "demo"
    (out / "hf_model").mkdir(parents=True)
    (out / "hf_model" / "config.json").write_text("{}")
    (out / DEMO_MARKER).write_text("an earlier demo\n")
    argv = ["--out", str(out), "--num-samples", "4", "--val-samples", "2", "--shard-size", "2"]
    code = main(argv + ["--ranks", "1", "--device", "cpu", "train.no_such_key=1"])
    assert code == 1
    assert (out / "data" / "train" / "00000.tar").exists()
    assert not (out / "hf_model").exists()


def test_demo_out_is_a_file_one_line(tmp_path, capsys):
    """--out naming an existing file: one line and exit code 1, the file untouched (was a
    FileExistsError traceback)."""
    from vutrain.demo import main

    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert main(["--out", str(target), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {target} cannot be the demo's folder") and err.count("\n") == 1
    assert target.read_text() == "mine\n"


def test_host_reads_counts_equal_and_allclose():
    """torch.equal and torch.allclose read the values on the host to answer a Python bool (a sync on
    a GPU) inside their own kernels, where no aten._local_scalar_dense reaches the mode: they
    counted 0 reads; each is one read at its call site, like ``.item()``."""
    import torch

    from vutrain.host_reads import HostReads

    x = torch.arange(6.0)
    with HostReads() as reads:
        torch.equal(x, x + 0)
        torch.allclose(x, x + 1e-9)
        x.sum().item()
    assert reads.total == 3
    innermost = [site.split(" <- ")[-1] for site in reads.sites]
    assert len(innermost) == 3 and all(s.startswith("test_review_tokenizer.py:") for s in innermost), (
        reads.sites
    )


def test_tokenizer_texts_read_no_image_bytes_and_stay_the_same(tmp_path, counted_reads):
    """iter_shard_texts (rank 0, before the other ranks start) read every member in full, images
    included; it now reads the .json and .txt members only, with the same texts."""
    import tarfile

    from vutrain.data.tokenizer import iter_shard_texts

    write_synthetic(str(tmp_path), 24, 12, image_size=96, seed=0, val_samples=0)
    spec = str(tmp_path / "train" / "{00000..00001}.tar")
    counted_reads.clear()
    texts = list(iter_shard_texts(spec, "{title}. tags: {tags}"))
    assert len(texts) >= 2 * 24 and sum(", " in t for t in texts) >= 24  # captions and each sample's tags
    images = 0
    for name in ("00000.tar", "00001.tar"):
        with tarfile.open(tmp_path / "train" / name) as tar:
            images += sum(m.size for m in tar if m.isfile() and m.name.endswith((".jpg", ".png", ".webp")))
    total = sum(os.path.getsize(tmp_path / "train" / n) for n in ("00000.tar", "00001.tar"))
    assert sum(counted_reads) <= total - images
