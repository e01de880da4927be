"""Triton kernels for contrastive losses, each with a plain-torch reference.

Importing this package needs neither a GPU nor Triton: the ops fall back to
``kernels.reference`` when Triton cannot run (see ``kernels.runtime``).
"""

from kernels.clip_loss import clip_loss
from kernels.contrastive_ce import contrastive_ce
from kernels.runtime import triton_available
from kernels.sigmoid_loss import sigmoid_loss

__all__ = ["clip_loss", "contrastive_ce", "sigmoid_loss", "triton_available"]
