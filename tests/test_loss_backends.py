"""Which implementation a loss call takes (vutrain/losses/backends.py), CUDA features included.

loss.backend=auto decides on `features.is_cuda`, which a CPU machine cannot make true. Here the
features are CPU tensors of a subclass that reports `is_cuda` (every computation stays a real CPU
one) and Triton counts as available, so the real loss code takes the branch it takes on a GPU:
"auto" must fall back to torch for what the kernels lack (multi-positive labels, ClipLoss's logit
bias, SigLIP's ring) with the torch loss's values, instead of raising, and the trainer must then
hand the loss fp32 features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss
from vutrain.trainer import features_for_loss, loss_features_dtype

B, D = 4, 8


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose `is_cuda` says True: the device flag the backend choice reads."""

    @property
    def is_cuda(self) -> bool:
        return True


@pytest.fixture
def triton_on_gpu(monkeypatch):
    """Triton counts as able to run (as on an H100 host), whatever this machine has."""
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def inputs():
    """Features [B, D] (two, L2-normalised), scale, bias and class labels [B] (two positives)."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    return (
        img,
        txt,
        torch.tensor(10.0, dtype=torch.float64),
        torch.tensor(-10.0, dtype=torch.float64),
        torch.tensor([0, 1, 0, 2]),
    )


def test_auto_takes_the_kernels_only_for_what_they_implement(triton_on_gpu):
    img, _, _, bias, labels = inputs()
    gpu = img.as_subclass(ReportsCuda)
    clip, siglip = ClipLoss(backend="auto"), SigLipLoss(backend="auto")
    assert clip.uses_kernels(gpu)
    assert not clip.uses_kernels(gpu, bias)  # the softmax kernel has no bias
    assert not clip.uses_kernels(gpu, None, labels)
    assert siglip.uses_kernels(gpu, bias)  # the sigmoid kernel takes the bias
    assert not siglip.uses_kernels(gpu, bias, labels)
    assert not SigLipLoss(backend="auto", bidir=True).uses_kernels(gpu, bias)
    assert not clip.uses_kernels(img) and not siglip.uses_kernels(img, bias)  # CPU features
    assert ClipLoss(backend="triton").uses_kernels(img, None, labels)  # asked for: forward says why not
    assert not ClipLoss(backend="torch").uses_kernels(gpu)
    assert not AlignUniformLoss().uses_kernels(gpu)


@pytest.mark.parametrize(
    "capability,dtype,kernels_run",
    [
        ((7, 5), torch.bfloat16, False),
        ((7, 5), torch.float16, True),
        ((8, 0), torch.bfloat16, True),
        ((6, 1), torch.float16, False),
    ],
)
def test_auto_stays_on_torch_where_triton_cannot_compile(
    triton_on_gpu, monkeypatch, capability, dtype, kernels_run
):
    # A Pascal card: Triton compiles nothing below 7.0, so "auto" picking the kernels failed the
    # first step; a T4 (7.5) in bf16: no bf16 tensor cores (an untested FMA path). "auto" keeps
    # such calls on torch, silently (a speed preference).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    img, _, _, bias, _ = inputs()
    gpu = img.to(dtype).as_subclass(ReportsCuda)
    assert ClipLoss(backend="auto").uses_kernels(gpu) == kernels_run
    assert SigLipLoss(backend="auto").uses_kernels(gpu, bias.to(dtype)) == kernels_run


def test_auto_without_triton_stays_on_torch(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    img, _, _, bias, _ = inputs()
    gpu = img.as_subclass(ReportsCuda)
    assert not ClipLoss(backend="auto").uses_kernels(gpu)
    assert not SigLipLoss(backend="auto").uses_kernels(gpu, bias)


@pytest.mark.parametrize("case", ["clip_labels", "clip_bias", "siglip_labels", "siglip_bidir"])
def test_auto_on_cuda_falls_back_to_the_torch_loss(triton_on_gpu, case):
    """Before: "auto" chose the kernels for any CUDA call and then raised on labels (both losses)
    and on ClipLoss's logit bias, so loss.positives=category|tags stopped every GPU run."""
    img, txt, scale, bias, labels = inputs()
    loss_cls, kwargs, args = {
        "clip_labels": (ClipLoss, {}, dict(labels=labels)),
        "clip_bias": (ClipLoss, {}, dict(logit_bias=bias)),
        "siglip_labels": (SigLipLoss, {}, dict(logit_bias=bias, labels=labels)),
        "siglip_bidir": (SigLipLoss, {"bidir": True}, dict(logit_bias=bias)),
    }[case]
    expected = loss_cls(backend="torch", **kwargs)(img, txt, scale, **args)
    got = loss_cls(backend="auto", **kwargs)(
        img.as_subclass(ReportsCuda), txt.as_subclass(ReportsCuda), scale, **args
    )
    torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=0, atol=0)


def test_explicit_triton_still_rejects_labels_with_a_clear_error():
    img, txt, scale, bias, labels = inputs()
    with pytest.raises(ValueError, match="loss.positives=pair"):
        ClipLoss(backend="triton")(img, txt, scale, labels=labels)
    with pytest.raises(ValueError, match="loss.positives=pair"):
        SigLipLoss(backend="triton")(img, txt, scale, bias, labels=labels)


def test_trainer_feature_dtype_follows_the_loss_choice():
    """fp32 whenever the torch loss runs (also an "auto" that fell back); 16-bit for the CUDA
    kernels, amp_bf16's fp32 features cast to bf16; fp32 for the interpreter on CPU."""
    for precision in ("fp32", "bf16", "amp_bf16"):
        assert loss_features_dtype(False, "cuda", precision) == torch.float32
        assert loss_features_dtype(True, "cpu", precision) == torch.float32
    assert loss_features_dtype(True, "cuda", "bf16") is None
    assert loss_features_dtype(True, "cuda", "fp32") is None
    assert loss_features_dtype(True, "cuda", "amp_bf16") == torch.bfloat16


def test_amp_bf16_on_a_gpu_without_bf16_kernels_keeps_the_torch_loss_in_fp32(triton_on_gpu, monkeypatch):
    """amp_bf16's features leave autocast in fp32 and go to the CUDA kernels as bf16. The loss was
    asked about the fp32 features, so on a T4 (no bf16 kernels below 8.0) "auto" said kernels,
    the trainer cast to bf16, and the op fell back to torch with bf16 logits (and a warning)."""
    img, txt, _, _, _ = inputs()
    gpu_img, gpu_txt = (x.float().as_subclass(ReportsCuda) for x in (img, txt))
    loss = ClipLoss(backend="auto")
    h100 = features_for_loss(loss, gpu_img, gpu_txt, None, None, "cuda", "amp_bf16")
    assert [t.dtype for t in h100] == [torch.bfloat16] * 2  # the kernels take bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    t4 = features_for_loss(loss, gpu_img, gpu_txt, None, None, "cuda", "amp_bf16")
    assert [t.dtype for t in t4] == [torch.float32] * 2 and not loss.uses_kernels(t4[0].bfloat16())
    assert loss.uses_kernels(gpu_img)  # fp32 kernels compile there
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 under autocast runs as bf16
        assert not loss.uses_kernels(gpu_img)
