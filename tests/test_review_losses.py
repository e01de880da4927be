"""GradCache with a learnt logit bias (SigLIP): the replayed backward applies the bias's cached
gradient once, as it does the scale's, so k micro-batches give the gradients of one big batch.

The other GradCache tests use models without a bias (clip, align_uniform), so nothing else checks
that branch of `GradCache.backward`. One process, fp64, dropout on (replayed), well under a second.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IN, HID, OUT, B, K = 6, 8, 4, 8, 2


class BiasedTwoTower(nn.Module):
    """Two towers with dropout, a learnt logit scale and a learnt logit bias (SigLIP's outputs)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Dropout(0.2), nn.Linear(HID, OUT))
        self.text = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))

    def forward(self, x_img, x_txt, chunks=1):
        # chunk by chunk, image then text: the RNG order of `chunks` separate forwards
        pairs = [(self.image(i), self.text(t)) for i, t in zip(x_img.chunk(chunks), x_txt.chunk(chunks))]
        img, txt = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.logit_scale.exp(), self.logit_bias


class GradsOnly:
    """engine.backward/step without an optimizer, so the accumulated gradients can be compared."""

    def __init__(self, k):
        self.k = k

    def gradient_accumulation_steps(self):
        return self.k

    def backward(self, loss, scale_wrt_gas=True):
        (loss / self.k if scale_wrt_gas else loss).backward()

    def step(self):
        pass


def test_gradcache_applies_the_logit_bias_gradient_once():
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import SigLipLoss

    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(B, IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(B, IN, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4])  # positives across the two micro-batches
    loss_fn = SigLipLoss()
    results = {}
    for mode in ("big", "gradcache"):
        torch.manual_seed(0)
        model = BiasedTwoTower().double()
        torch.manual_seed(1)  # the dropout masks: same draws in both modes
        if mode == "big":
            loss = loss_fn(*model(x_img, x_txt, chunks=K), labels=labels)
            loss.backward()
        else:
            micro_batches = list(zip(x_img.chunk(K), x_txt.chunk(K)))
            loss = gradcache_step(
                GradsOnly(K),
                micro_batches,
                lambda mb: model(*mb),
                lambda i, t, s, b: loss_fn(i, t, s, b, labels=labels),
            )
        grads = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        }
        results[mode] = loss.detach(), grads
    (want_loss, want), (got_loss, got) = results["big"], results["gradcache"]
    torch.testing.assert_close(got_loss, want_loss)
    assert want["logit_bias"].abs() > 1e-3  # the bias has a gradient worth checking
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)
