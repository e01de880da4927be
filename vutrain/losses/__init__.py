"""Contrastive losses with negatives from every rank.

* `ClipLoss` - softmax CLIP loss, open_clip-compatible (clip.py), torch or Triton backend.
* `SigLipLoss` - sigmoid loss, open_clip-compatible (siglip.py), gathered or ring exchange (bidir).
* `AlignUniformLoss` - alignment + uniformity, the two terms reported in `last_terms`.
* `build_loss` - config name -> loss object (factory.py).
* gather.py - the autograd-aware collectives they share; exchange.py - SigLIP's ring.
* positives.py - multi-positive labels (`forward(..., labels=...)` of ClipLoss and SigLipLoss).
"""

from vutrain.losses.align_uniform import AlignUniformLoss
from vutrain.losses.clip import ClipLoss
from vutrain.losses.factory import LOSS_NAMES, build_loss, build_loss_from_config
from vutrain.losses.siglip import SigLipLoss

__all__ = ["AlignUniformLoss", "ClipLoss", "LOSS_NAMES", "SigLipLoss", "build_loss", "build_loss_from_config"]
