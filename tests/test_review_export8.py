"""Review of the export as a user runs it after ZeRO-3 + LoRA training with the sigmoid loss, in fp32
and bf16: a checkpoint saved mid-epoch and the final one, loaded with `CLIPModel.from_pretrained`
and the exported processor, give the features, logit scale and bias the trainer's model had when it
saved them; a second export into the same folder is refused and leaves the first whole; an empty
OUT_DIR or `--tag` (an unset shell variable) is one line saying so, before any work."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from inprocess_trainer import train_outside_test

TEXTS = ["a red circle", "a blue square video", "green"]
MID_EPOCH, FINAL = "step_00000002", "step_00000003"  # an epoch is 16 steps of 16 samples


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (90, 160, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def run(request, tiny_shards, tmp_path_factory):
    """(precision, run dir, {tag: the trainer's (image features, text features, scale, bias) at that
    save}): a ZeRO-3 + LoRA SigLIP run of 3 steps, checkpointed at step 2 and at the end."""
    precision = request.param
    run_dir = str(tmp_path_factory.mktemp(f"export8_{precision}") / "run")
    saved = {}

    def capture(trainer):
        save = trainer.save

        def save_and_capture():
            module = trainer.engine.module
            dtype = next(module.parameters()).dtype
            pixels = torch.stack([trainer.preprocess(image) for image in _images()]).to(dtype)
            tokens = trainer.tokenize(TEXTS)
            with torch.no_grad():  # ZeRO-3 gathers the weights here, while the process group lives
                out = module.eval()(pixels, tokens["input_ids"], tokens["attention_mask"])
            module.train()
            # clone: the bias is a view of the parameter, which the next steps update in place
            saved[f"step_{trainer.step:08d}"] = [t.detach().float().clone() for t in out]
            save()

        trainer.save = save_and_capture

    train_outside_test(
        tiny_shards,
        run_dir,
        steps=3,
        one_thread=True,
        on_trainer=capture,
        train__zero_stage=3,
        train__precision=precision,
        train__lr=0.01,
        train__checkpoint_every=2,
        eval__every=0,
        data__val_shards="",
        model__lora__enabled="true",
        loss__name="siglip",
    )
    assert sorted(saved) == [MID_EPOCH, FINAL]
    return precision, run_dir, saved


@pytest.mark.parametrize("tag", [MID_EPOCH, FINAL])
def test_export_gives_the_features_scale_and_bias_of_the_checkpoint(run, tmp_path, tag):
    """HF's features of the exported model with its own processor and tokenizer are the trainer's at
    that save: equal in fp32; in bf16 within bf16's rounding, since the export carries the fp32
    masters the bf16 forward rounded. The scale is HF's scalar, the bias config.logit_bias."""
    from transformers import CLIPModel, CLIPProcessor

    from vutrain.export import export

    precision, run_dir, saved = run
    with torch.no_grad():
        out = export(run_dir, str(tmp_path / "hf"), tag=None if tag == FINAL else tag)
    model = CLIPModel.from_pretrained(out).eval()
    inputs = CLIPProcessor.from_pretrained(out)(
        text=TEXTS, images=_images(), padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    want_img, want_txt, want_scale, want_bias = saved[tag]
    tol = 1e-5 if precision == "fp32" else 2e-2
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(normalize(img, dim=-1), want_img, atol=tol, rtol=0)
    torch.testing.assert_close(normalize(txt, dim=-1), want_txt, atol=tol, rtol=0)
    # bf16's spacing at 10 is 1/16: the trainer's scale and bias are the masters rounded to it.
    tol = 1e-6 if precision == "fp32" else 1 / 16
    assert math.exp(float(model.logit_scale.detach())) == pytest.approx(float(want_scale), abs=tol * 10)
    assert model.config.logit_bias == pytest.approx(float(want_bias), abs=tol)
    if tag == MID_EPOCH:  # not the final weights
        other = saved[FINAL][0]
        assert not torch.allclose(normalize(img, dim=-1), other, atol=1e-4, rtol=0)


def test_second_export_into_the_same_folder_is_refused_and_keeps_the_first(run, tmp_path, capsys):
    """Exporting again into a folder an export filled (another --tag) is one `error:` line; the
    first export's files stay as they were and still load."""
    from transformers import CLIPModel

    from vutrain.export import main

    precision, run_dir, _ = run
    if precision != "fp32":
        pytest.skip("the folder handling does not depend on the precision")
    out = tmp_path / "hf"
    assert main([run_dir, str(out), "--tag", MID_EPOCH]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert main([run_dir, str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"error: OUT_DIR {out} is not empty"), err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    CLIPModel.from_pretrained(out)


@pytest.mark.parametrize("argv", [["", "--tag", MID_EPOCH], ["OUT", "--tag", ""]], ids=["out_dir", "tag"])
def test_an_empty_out_dir_or_tag_is_one_line_saying_so(run, tmp_path, monkeypatch, capsys, argv):
    """`vutrain-export RUN "$OUT"` with OUT unset: the current folder, whose files were then
    reported as "filled during the export" after the whole consolidation (before). `--tag "$TAG"`
    with TAG unset named the checkpoints folder, reported as an interrupted save (before). Now
    one line each, and nothing is written."""
    from vutrain.export import main

    precision, run_dir, _ = run
    if precision != "fp32":
        pytest.skip("the argument handling does not depend on the precision")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's\n")
    monkeypatch.chdir(cwd)
    assert main([run_dir, *argv]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: "), err
    if argv[0] == "":
        assert "OUT_DIR is empty" in last, last
    else:
        assert "no such checkpoint" in last and "interrupted" not in last, last
    assert os.listdir(cwd) == ["notes.txt"]
