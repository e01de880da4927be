"""The demo's pipeline at a smaller size (data -> DeepSpeed ZeRO-2 on 2 ranks -> eval -> export ->
HF pipeline), and the training benchmark harness on CPU."""

import json
import os
import re
import subprocess
import sys

import pytest

import train_runner as tr


def test_demo_pipeline_small(tmp_path):
    """Run from another directory without --out: the output lands in ./demo_out there (it went to
    the package's directory: site-packages on an installed package)."""
    out = tmp_path / "demo_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vutrain.demo",
            "--num-samples",
            "512",
            "--val-samples",
            "48",
            "--shard-size",
            "64",
            "--steps",
            "4",
            "--min-top1",
            "0",
            "train.micro_batch_size=16",
            "eval.every=2",
            "model.vocab_size=512",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=tr.env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, tr.describe(proc)
    assert "zero-shot top-1 on the held-out set" in proc.stdout
    found = re.search(r"\(chance (0\.\d+), (\d+) classes\)", proc.stdout)
    assert found and float(found.group(1)) == pytest.approx(1 / int(found.group(2)), abs=1e-3)
    assert int(found.group(2)) >= 20  # the held-out classes (colour x shape) seen in 48 samples
    assert "predicted:" in proc.stdout
    assert os.path.exists(out / "hf_model" / "model.safetensors")
    assert os.path.exists(out / "hf_model" / "tokenizer.json")
    evals = [r for r in tr.metrics(str(out / "run")) if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]


def test_demo_fails_loudly_below_the_bar(tmp_path):
    """--min-top1 is a real check: a bar one training step cannot reach (1, a perfect top-1; above
    1 is refused as not a fraction) makes the demo exit non-zero. A relative --out from another
    directory: the ranks (run in the package's directory) looked for the shards there."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vutrain.demo",
            "--out",
            "demo",
            "--num-samples",
            "256",
            "--val-samples",
            "24",
            "--shard-size",
            "64",
            "--steps",
            "1",
            "--ranks",
            "1",
            "--min-top1",
            "1",
            "train.micro_batch_size=8",
            "model.vocab_size=512",
            "data.num_workers=0",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=tr.env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, tr.describe(proc)
    assert "FAIL: zero-shot top-1" in proc.stderr
    assert (tmp_path / "demo" / "hf_model" / "config.json").exists()


@pytest.mark.parametrize(
    "visible,ranks,gpu,want",
    [
        ("3,5", 1, True, ["--include", "localhost:3"]),  # deepspeed --num_gpus 1 would take GPU 0
        ("3,5", 2, True, ["--include", "localhost:3,5"]),
        (None, 1, True, ["--num_gpus", "1"]),
        ("GPU-1b2c", 1, True, ["--num_gpus", "1"]),  # UUIDs: beyond deepspeed's --include
        ("3", 2, False, ["--num_gpus", "2"]),  # CPU ranks: the GPUs do not matter
    ],
)
def test_demo_trains_on_the_visible_gpus(monkeypatch, tmp_path, visible, ranks, gpu, want):
    """The demo's launcher command keeps a CUDA_VISIBLE_DEVICES choice (no launch here)."""
    from vutrain import demo

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("VUTRAIN_DEVICE", raising=False)
    launched = []

    def run(cmd, **kw):
        launched.append((cmd, kw["env"]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", run)
    demo.train(str(tmp_path), "train.tar", "val.tar", ranks, 1, [], gpu)
    ((cmd, env),) = launched
    picked = cmd[1 : cmd.index("--master_port")]
    assert picked == want
    assert ("VUTRAIN_DEVICE" in env) == (not gpu)
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES"):  # more ranks than visible GPUs
        demo.rank_devices(3, True, {"CUDA_VISIBLE_DEVICES": "3,5"})


def test_bench_harness_measures_and_records(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vutrain.bench",
            "--batch-sizes",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=tr.env(),
        cwd=tr.REPO,
    )
    assert proc.returncode == 0, tr.describe(proc)
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["batch_size"] == 8
    assert rows[0]["samples_per_s"] > 0 and rows[0]["peak_rss_gib"] > 0
    # wall clock over the timed steps: what the comparison with open_clip measures
    assert rows[0]["wall_samples_per_s"] > 0 and rows[0]["wall_step_time_s"] >= rows[0]["forward_s"]
    # timed over steps of their own, without the phase split's GPU syncs (it was the same steps)
    assert rows[0]["wall_timing"] == "separate steps, no phase syncs, one sync after the last"
    for phase in ("data_s", "forward_s", "loss_s", "backward_s", "optimizer_s"):
        assert rows[0][phase] >= 0
    assert "| tiny | fp32 | 2 | 8 |" in proc.stdout


class _Launched(Exception):
    pass


@pytest.mark.parametrize(
    "native_bf16,user,want",
    [(True, [], "bf16"), (False, [], "fp32"), (False, ["train.precision=fp16"], "fp16")],
)
def test_demo_precision_on_a_gpu_follows_its_bf16_support(
    monkeypatch, tmp_path, capsys, native_bf16, user, want
):
    """Before Ampere (T4, V100) the GPU has no bf16 of its own: the GPU recipe trains in fp32
    there instead of asking torch to emulate bf16; a user's own override still wins."""
    from vutrain import demo

    monkeypatch.setattr(demo, "use_gpu", lambda device: True)
    monkeypatch.setattr(demo, "native_bf16", lambda: native_bf16)
    monkeypatch.setattr(demo, "write_data", lambda *a: ("train.tar", "val.tar"))
    seen = []

    def train(run_dir, train_shards, val_shards, ranks, steps, overrides, gpu):
        seen.extend(overrides)
        raise _Launched

    monkeypatch.setattr(demo, "train", train)
    with pytest.raises(_Launched):
        demo.main(["--out", str(tmp_path), *user])
    precisions = [o.split("=", 1)[1] for o in seen if o.startswith("train.precision=")]
    assert precisions[-1] == want, seen
    assert f"GPU rank(s), {want}" in capsys.readouterr().out


def test_demo_asks_for_bf16_in_a_child_process():
    """The answer comes from a child (no CUDA context left in the demo's own process); on this
    CPU-only torch there is no GPU bf16, on a GPU machine the answer matches torch's."""
    import torch

    from vutrain import demo

    assert demo.native_bf16() == (torch.cuda.is_available() and torch.cuda.is_bf16_supported(False))


def test_demo_failures_are_one_line(tmp_path, capsys):
    """A failed training run ended the demo in a CalledProcessError traceback under the run's own
    message; a run without evaluation in an IndexError; --ranks 0 meant the default."""
    from vutrain import demo

    small = ["--out", str(tmp_path), "--num-samples", "64", "--val-samples", "24", "--shard-size", "32"]
    code = demo.main([*small, "--steps", "1", "--device", "cpu", "train.no_such_key=1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "error: training exited 2 (its own message is above)", err
    quick = [
        "--steps",
        "1",
        "--ranks",
        "1",
        "--device",
        "cpu",
        "train.micro_batch_size=8",
        "data.num_workers=0",
    ]
    code = demo.main([*small, *quick, "data.val_shards=", "eval.every=0"])
    err = capsys.readouterr().err
    assert code == 1 and "metrics.jsonl has no zero-shot evaluation" in err.strip().splitlines()[-1], err
    with pytest.raises(SystemExit):
        demo.main([*small, "--ranks", "0"])
    assert "--ranks: 0 is not a positive integer" in capsys.readouterr().err


def test_demo_replaces_only_its_own_output(tmp_path, capsys):
    """`--out .` in a project with its own data/ deleted it without a word. The demo now replaces
    data/, run/ and hf_model/ only in a folder it marked (or one a demo wrote before the marker)."""
    from vutrain import demo

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "mine.csv").write_text("keep me\n")
    code = demo.main(["--out", str(project), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(
        f"error: --out {project} already has data/ that the demo did not"
    ), err
    assert (project / "data" / "mine.csv").read_text() == "keep me\n"
    assert not (project / demo.DEMO_MARKER).exists()

    # A folder a demo wrote before the marker: its run trained on its own data/train.
    legacy = tmp_path / "demo_out"
    (legacy / "data" / "train").mkdir(parents=True)
    (legacy / "run").mkdir()
    shards = f"{legacy}/data/train/{{00000..00001}}.tar"
    (legacy / "run" / "config.yaml").write_text(f"data:\n  train_shards: {shards}\n")
    demo.claim_output(str(legacy))
    assert (legacy / demo.DEMO_MARKER).exists()
    demo.claim_output(str(legacy))  # marked: the demo's again next time
    (legacy / "run" / "config.yaml").write_text("data:\n  train_shards: /elsewhere/{0..1}.tar\n")
    (legacy / demo.DEMO_MARKER).unlink()
    with pytest.raises(demo.DemoError, match="already has data/, run/ that the demo did not write"):
        demo.claim_output(str(legacy))
