"""Small torch modules that tests build real DeepSpeed engines around."""

from __future__ import annotations

import torch
from torch import nn


class TwoLayer(nn.Module):
    """8 -> hidden -> 4 with tanh; forward returns a scalar loss."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.a = nn.Linear(8, hidden)
        self.b = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


class PoisonGrad(torch.autograd.Function):
    """Identity whose backward puts a NaN into the gradient when asked (a finite loss, a bad gradient)."""

    @staticmethod
    def forward(ctx, x, poison: bool):
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.poison:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad, None
