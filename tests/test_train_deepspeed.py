"""Real DeepSpeed runs on 2 CPU ranks (gloo) through the real launchers: ZeRO 1, 2 and 3,
resume exactness (clean pre-emption and SIGKILL), corrupt-sample skipping, LoRA + export."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile

import psutil
import pytest
import torch

import train_runner as tr

REQUIRED_TRAIN = {
    "train/loss",
    "train/lr",
    "train/samples_per_s",
    "train/samples_per_s_per_rank",
    "train/logit_scale",
    "train/step_time",
    "train/data_time",
    "train/skipped_samples",
}
REQUIRED_EVAL = {"eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5", "eval/zeroshot_top1"}


def corrupt_copy(spec_dir: str, dst: str) -> str:
    """Copy every training shard, putting three bad samples in front of the good ones."""
    os.makedirs(dst)
    names = sorted(n for n in os.listdir(spec_dir) if n.endswith(".tar"))
    good_jpg = None
    for name in names:
        with (
            tarfile.open(os.path.join(spec_dir, name)) as src,
            tarfile.open(os.path.join(dst, name), "w") as out,
        ):
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
            good_jpg = good_jpg or next(data for m, data in members if m.name.endswith(".jpg"))
            meta = json.dumps({"title": "bad", "category_name": "bad", "tags": []}).encode()
            bad = [
                (f"0000bad{name[:5]}a.jpg", good_jpg[: len(good_jpg) // 3]),  # truncated JPEG
                (f"0000bad{name[:5]}a.txt", b"truncated"),
                (f"0000bad{name[:5]}a.json", meta),
                (f"0000bad{name[:5]}b.txt", b"no image"),
                (f"0000bad{name[:5]}b.json", meta),  # no .jpg
                (f"0000bad{name[:5]}c.jpg", good_jpg),
                (f"0000bad{name[:5]}c.txt", b"\xff\xfe\xfa bad utf8"),
                (f"0000bad{name[:5]}c.json", b"{not json"),
            ]
            for member_name, data in bad + [(m.name, d) for m, d in members]:
                info = tarfile.TarInfo(member_name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    for extra in ("sizes.json", "__len__"):
        with open(os.path.join(spec_dir, extra), "rb") as fh, open(os.path.join(dst, extra), "wb") as out:
            out.write(fh.read())
    return os.path.join(dst, "{" + ",".join(n[:-4] for n in names) + "}.tar")


def test_zero1_skips_corrupt_samples_and_evaluates(synthetic_shards, tmp_path):
    shards = dict(
        synthetic_shards,
        train_shards=corrupt_copy(
            os.path.dirname(synthetic_shards["train_shards"]), str(tmp_path / "corrupt")
        ),
    )
    run_dir = str(tmp_path / "run")
    # loss.backend=triton: the fused kernels inside the training loop (under the Triton
    # interpreter that conftest turns on for CPU sessions, or their torch fallback otherwise).
    proc = tr.run(
        "deepspeed",
        tr.base_overrides(
            shards,
            run_dir,
            4,
            train__zero_stage=1,
            eval__every=2,
            train__checkpoint_every=2,
            loss__backend="triton",
        ),
    )
    assert proc.returncode == 0, tr.describe(proc)
    assert "world_size=2" in proc.stdout + proc.stderr
    rows = tr.metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert REQUIRED_TRAIN <= r.keys()
    # Every shard starts with three bad samples, and each rank reads at least one shard.
    assert train_rows[-1]["train/skipped_samples"] >= 3
    evals = [r for r in rows if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert REQUIRED_EVAL <= evals[-1].keys()
    assert evals[-1]["eval/num_samples"] == 96  # every held-out sample scored once across the ranks
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000004"))
    assert json.load(open(os.path.join(run_dir, "done.json")))["step"] == 4
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000


def _signal_ranks(launcher_pid: int, sig: int) -> int:
    """Send `sig` to the training ranks (not the launcher), as SLURM's --signal does."""
    hits = 0
    for child in psutil.Process(launcher_pid).children(recursive=True):
        # A rank has LOCAL_RANK set by the launcher; its data-loader workers are its children.
        if "LOCAL_RANK" in child.environ() and "LOCAL_RANK" not in child.parent().environ():
            child.send_signal(sig)
            hits += 1
    return hits


@pytest.fixture(scope="module")
def reference_losses(synthetic_shards, tmp_path_factory):
    """Eight uninterrupted ZeRO-2 steps: the losses the resumed runs must reproduce."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    proc = tr.run(
        "deepspeed",
        tr.base_overrides(synthetic_shards, run_dir, 8, train__zero_stage=2, train__checkpoint_every=3),
    )
    assert proc.returncode == 0, tr.describe(proc)
    losses = tr.losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    return losses


def test_preemption_checkpoint_and_resume_are_exact(synthetic_shards, tmp_path, reference_losses):
    """SIGUSR1 to the ranks mid-run: checkpoint at the next step, exit 75; resuming (this time
    under torchrun) gives the same per-step losses as the uninterrupted run."""
    run_dir = str(tmp_path / "run")
    overrides = tr.base_overrides(
        synthetic_shards, run_dir, 8, train__zero_stage=2, train__checkpoint_every=3
    )
    proc = tr.start("deepspeed", overrides, log_path=str(tmp_path / "first.log"))
    tr.wait_for_step(run_dir, 4, proc)
    assert _signal_ranks(proc.pid, signal.SIGUSR1) == 2
    code = proc.wait(timeout=300)
    log = open(tmp_path / "first.log").read()
    assert code == 75, log[-5000:]
    stopped = json.load(open(os.path.join(run_dir, "preempted.json")))["step"]
    assert 4 <= stopped < 8
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == f"step_{stopped:08d}"

    again = tr.run("torchrun", overrides)
    assert again.returncode == 0, tr.describe(again)
    assert f"resuming at step {stopped}" in again.stdout + again.stderr
    assert not os.path.exists(os.path.join(run_dir, "preempted.json"))
    losses = tr.losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    for step in range(1, 9):
        assert losses[step] == pytest.approx(reference_losses[step], abs=1e-5), step


def test_sigkill_between_checkpoints_resumes_exactly(synthetic_shards, tmp_path, reference_losses):
    run_dir = str(tmp_path / "run")
    overrides = tr.base_overrides(
        synthetic_shards, run_dir, 8, train__zero_stage=2, train__checkpoint_every=3
    )
    proc = tr.start("deepspeed", overrides, log_path=str(tmp_path / "first.log"))
    tr.wait_for_step(run_dir, 5, proc)  # checkpoints at 3 (and 6): killed between them
    tr.kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest in ("step_00000003", "step_00000006")

    again = tr.run("deepspeed", overrides)
    assert again.returncode == 0, tr.describe(again)
    assert f"resuming at step {int(latest[5:])}" in again.stdout + again.stderr
    losses = tr.losses(run_dir)
    assert sorted(losses) == list(range(1, 9))  # rows after the checkpoint were replaced, not doubled
    for step in range(1, 9):
        assert losses[step] == pytest.approx(reference_losses[step], abs=1e-5), step
    kept = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step_"))
    assert kept == ["step_00000006", "step_00000008"]  # keep_checkpoints=2


def test_zero3_lora_bf16_then_export_round_trip(synthetic_shards, tmp_path):
    from transformers import CLIPModel, pipeline

    from vutrain.config import load_config
    from vutrain.data.val import iter_val_batches
    from vutrain.export import export, load_trained_module
    from vutrain.model import build_model

    run_dir = str(tmp_path / "run")
    proc = tr.run(
        "deepspeed",
        tr.base_overrides(
            synthetic_shards,
            run_dir,
            4,
            train__zero_stage=3,
            train__precision="bf16",
            model__lora__enabled="true",
            train__lr=0.01,
        ),
    )
    assert proc.returncode == 0, tr.describe(proc)
    assert "world_size=2" in proc.stdout + proc.stderr

    out = str(tmp_path / "hf")
    export(run_dir, out)
    exported = CLIPModel.from_pretrained(out).eval()
    module, tokenizer, processor, _ = load_trained_module(run_dir)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))

    # LoRA semantics: adapted projections moved, everything else is the seed's initial weights.
    cfg.model.lora.enabled = False
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, tokenizer).base
    # Frozen weights live in bf16 under train.precision=bf16, so compare with the rounded init.
    layer = "vision_model.encoder.layers.0.self_attn"
    rounded = {k: v.to(torch.bfloat16).float() for k, v in initial.state_dict().items()}
    assert not torch.equal(exported.state_dict()[f"{layer}.q_proj.weight"], rounded[f"{layer}.q_proj.weight"])
    assert torch.equal(exported.state_dict()[f"{layer}.k_proj.weight"], rounded[f"{layer}.k_proj.weight"])

    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.tokenizer import make_tokenize

    batch = next(
        iter_val_batches(
            synthetic_shards["val_shards"],
            preprocess=make_preprocess(processor),
            tokenize=make_tokenize(tokenizer, 32),
            batch_size=8,
        )
    )
    with torch.no_grad():
        img, txt, scale, _ = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        expected = scale * img @ txt.T
        got = exported(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        ).logits_per_image
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)

    classifier = pipeline("zero-shot-image-classification", model=out)
    from PIL import Image

    result = classifier(
        Image.new("RGB", (64, 64), (200, 30, 30)), candidate_labels=["red circle", "blue square"]
    )
    assert {r["label"] for r in result} == {"red circle", "blue square"}

    # The exported directory is a pretrained model for the next run (model.name_or_path), which
    # brings its own tokenizer and image processor: the fine-tuning path of vit-b-32-lora.yaml.
    tuned = str(tmp_path / "tuned")
    proc = tr.run(
        "python",
        tr.base_overrides(
            synthetic_shards,
            tuned,
            2,
            model__name_or_path=out,
            model__lora__enabled="true",
            data__num_workers=0,
        ),
        ranks=1,
    )
    assert proc.returncode == 0, tr.describe(proc)
    assert not os.path.exists(os.path.join(tuned, "tokenizer"))  # no tokenizer trained: the model's own
    assert sorted(tr.losses(tuned)) == [1, 2]


def test_nonfinite_losses_stop_the_run_with_a_clear_error(synthetic_shards, tmp_path):
    """An absurd learning rate blows the weights up: the steps are skipped, then the run stops."""
    run_dir = str(tmp_path / "run")
    proc = tr.run(
        "python",
        tr.base_overrides(
            synthetic_shards,
            run_dir,
            20,
            train__lr=1e30,
            train__warmup_steps=0,
            train__grad_clip=0,
            train__max_nonfinite_steps=3,
            train__checkpoint_every=1,
            data__val_shards="",
            data__num_workers=0,
        ),
        ranks=1,
    )
    assert proc.returncode != 0
    assert "3 non-finite losses in a row" in proc.stderr
    assert "Last good checkpoint: step_" in proc.stderr
    assert not os.path.exists(os.path.join(run_dir, "done.json"))
