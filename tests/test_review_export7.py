"""Review of the exported model as a Hugging Face user loads it (transformers 5, no vutrain): the
tokenizer normalises class labels as training's does (NFKC, final sigma, ß, whitespace), the
processor gives eval's pixel values, the model gives eval's embeddings and the clamped logit scale,
and the zero-shot pipeline's limit on long labels is what the README says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from inprocess_trainer import train_outside_test

CONTEXT = 32  # the tiny preset's model.context_length


@pytest.fixture(scope="module")
def exported(tiny_shards, tmp_path_factory):
    """(the trainer of one tiny run, its export folder): the tests only read them."""
    from vutrain.export import export

    base = tmp_path_factory.mktemp("export7")
    captured = {}
    train_outside_test(
        tiny_shards,
        str(base / "run"),
        steps=1,
        one_thread=True,
        on_trainer=lambda t: captured.update(trainer=t),
        train__lr=0.01,
        eval__every=0,
        data__val_shards="",
    )
    with torch.no_grad():
        out = export(str(base / "run"), str(base / "hf"))
    return captured["trainer"], out


def _images() -> list[Image.Image]:
    """Real PIL images of the shapes and modes a user passes: landscape, portrait, smaller than the
    crop (the processor pads), grey, palette, RGBA."""
    rng = np.random.RandomState(0)
    rgb = [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 160), (201, 77), (40, 50))]
    images = [Image.fromarray(a) for a in rgb]
    images.append(Image.fromarray(rng.randint(0, 256, (120, 120), dtype=np.uint8), mode="L"))
    images.append(images[0].convert("P", palette=Image.Palette.ADAPTIVE))
    images.append(Image.fromarray(rng.randint(0, 256, (70, 99, 4), dtype=np.uint8), mode="RGBA"))
    return images


LABELS = ["ＧＴＡ５", "Straße", "Lets  Play", "ΟΔΟΣ", "ﬁfa", "Music"]


@pytest.mark.parametrize("load", ["AutoTokenizer", "CLIPProcessor"])
def test_exported_tokenizer_normalises_labels_as_training_does(exported, load):
    """A full-width or German class label gets the ids training's tokenizer gives it, and those of
    its normal form (the zero-shot class as eval names it)."""
    import transformers

    from vutrain.tag_text import normalize_tag

    trainer, out = exported
    loaded = getattr(transformers, load).from_pretrained(out)
    tokenizer = loaded.tokenizer if load == "CLIPProcessor" else loaded
    prompts = [f"a thumbnail of {label}." for label in LABELS]
    got = tokenizer(prompts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    assert got["input_ids"].tolist() == trainer.tokenize(prompts)["input_ids"].tolist()
    normal = [f"a thumbnail of {normalize_tag(label)}." for label in LABELS]
    assert got["input_ids"].tolist() == trainer.tokenize(normal)["input_ids"].tolist()


def test_processor_gives_evals_pixel_values(exported):
    """Size, crop, mean/std and resample of the exported processor are eval's: equal pixel values
    (the processor pads images smaller than the crop, as eval does)."""
    from transformers import CLIPProcessor

    trainer, out = exported
    processor = CLIPProcessor.from_pretrained(out).image_processor
    for image in _images():
        got = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        expected = trainer.preprocess(image)
        assert got.shape == expected.shape == (3, 64, 64), image.size
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_hf_embeddings_and_logit_scale_are_evals(exported):
    """The exported CLIPModel's normalised image and text features are eval's for the same inputs,
    and its logit scale is the one training used (clamped to [0, ln 100])."""
    from transformers import CLIPModel, CLIPProcessor

    from vutrain.model import MAX_LOGIT_SCALE

    trainer, out = exported
    model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    module = trainer.engine.module.eval()
    images, texts = _images(), [f"a thumbnail of {label}." for label in LABELS]
    inputs = processor(text=texts, images=images, padding=True, truncation=True, return_tensors="pt")
    pixels = torch.stack([trainer.preprocess(image) for image in images])
    tokens = trainer.tokenize(texts)
    with torch.no_grad():
        img, txt, scale, _ = module(pixels, tokens["input_ids"], tokens["attention_mask"])
        hf_img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        hf_txt = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        logits = model(**inputs).logits_per_image
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(normalize(hf_img, dim=-1), img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize(hf_txt, dim=-1), txt, atol=1e-5, rtol=1e-5)
    trained_scale = module.clip.logit_scale.detach().reshape(())  # the parameter, unclamped
    exported_scale = float(model.logit_scale.detach())
    assert exported_scale == pytest.approx(float(trained_scale.clamp(0, MAX_LOGIT_SCALE)), abs=1e-7)
    assert float(scale) == pytest.approx(math.exp(exported_scale), rel=1e-6)
    torch.testing.assert_close(logits, scale * img @ txt.T, atol=1e-4, rtol=1e-4)


def test_zero_shot_with_a_label_longer_than_the_context(exported):
    """The pipeline gives the model's probabilities; a prompt past the context length is classified
    the way the README says (the processor with truncation=True: transformers 5's pipeline neither
    truncates nor passes its tokenizer_kwargs on), on the ids eval gives it."""
    from transformers import CLIPModel, CLIPProcessor, pipeline

    trainer, out = exported
    model, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    image, template = _images()[0], "a thumbnail of {}."
    short, long = ["Gaming", "Straße"], ["Gaming", "a very long class name about music videos " * 6]

    clf = pipeline("zero-shot-image-classification", model=out)
    results = clf(image, candidate_labels=short, hypothesis_template=template)
    scores = {r["label"]: r["score"] for r in results}
    prompts = [template.format(c) for c in short]
    inputs = processor(text=prompts, images=image, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    assert [scores[c] for c in short] == pytest.approx(probs.tolist(), abs=1e-6)

    # The README's way for long labels.
    texts = [template.format(c) for c in long]
    inputs = processor(text=texts, images=image, padding=True, truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == CONTEXT
    assert inputs["input_ids"].tolist() == trainer.tokenize(texts)["input_ids"].tolist()
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
