"""Review of the kernel ops' argument handling (fifteenth round): clip_loss's errors name its own
arguments. Its shape, dtype and device checks are the shared ``check_inputs``, which named
``queries`` and ``keys`` (contrastive_ce's arguments): image and text features on two devices read
"queries (cpu) and keys (meta) must be on the same device" from a call that has neither.

Both paths: the Triton kernels (the interpreter on CPU; the conftest sets TRITON_INTERPRET) and
the torch reference. A ``meta`` tensor stands in for a second device. Expected runtime: ~2 s.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import kernels
from kernels import reference

N, D = 4, 8
IMG = torch.randn(N, D)

# (what is wrong, text features that make it so, what the error must say)
BAD_TEXT = {
    "device": (torch.empty(N, D, device="meta"), r"image_features \(cpu\) and text_features \(meta\)"),
    "dtype": (torch.randn(N, D).bfloat16(), r"image_features \(torch.float32\) and text_features"),
    "width": (torch.randn(N, D + 1), r"image_features have D=8 but text_features have D=9"),
    "rank": (torch.randn(N, D, 1), r"image_features and text_features must be 2-D"),
    "integers": (torch.ones(N, D, dtype=torch.long), r"image_features and text_features must be floating"),
}
PATHS = {"kernels": kernels.clip_loss, "reference": reference.clip_loss_reference}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wrong", BAD_TEXT)
def test_clip_loss_errors_name_image_and_text_features(path, wrong):
    text, says = BAD_TEXT[wrong]
    with pytest.raises(ValueError, match=f"^{says}") as info:
        PATHS[path](IMG, text, 10.0)
    message = str(info.value)
    assert "queries" not in message and "keys" not in message, message
    assert "\n" not in message


def test_empty_clip_features_name_image_and_text_features():
    with pytest.raises(ValueError, match="^image_features and text_features must each hold at least one row"):
        kernels.clip_loss(torch.empty(0, D), torch.empty(0, D), 10.0)


def test_the_other_ops_still_name_queries_and_keys():
    with pytest.raises(ValueError, match=r"^queries \(cpu\) and keys \(meta\) must be on the same device"):
        kernels.contrastive_ce(IMG, torch.empty(N, D, device="meta"), 10.0)
    with pytest.raises(ValueError, match=r"^queries \(N=4\) outnumber keys \(M=2\).* as keys$"):
        kernels.sigmoid_loss(IMG, IMG[:2], 10.0, -1.0)
