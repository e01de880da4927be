"""Losses and GradCache where a serious user leaves the beaten path, against fp64 references
written from the definitions:

* `AlignUniformLoss` used directly (the config caps `uniform_t` at 20, the class does not) with a
  large t on far-apart pairs: the uniformity term is the exact log-mean, not log(0) = -inf, on one
  process and on 2 real gloo ranks (mean of per-rank losses = L, rank gradients = W x dL/dslice).
* GradCache on 2 gloo ranks with micro-batches of unequal size (5 rows per rank cut 3 + 2, as a
  micro size that does not divide the batch cuts them), tag id sets whose width differs per
  micro-batch, SigLIP's ring and align_uniform: rank-averaged parameter gradients equal those of
  one process on the whole 10-sample batch.
* `python -m vutrain.gradcache_bench` with a batch that `--micro` does not divide, or a micro
  larger than the batch, runs its step (until 2026-12-06 a ValueError traceback), and bad sizes
  are a one-line usage error.

One spawn of 2 ranks plus one tiny-preset step; about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_dist import run_distributed

WORLD, B, D, IN = 2, 5, 4, 6
TOL64 = dict(rtol=1e-9, atol=1e-12)
HIGH_T = 50.0  # every pair at t d^2 >= ~150: exp underflows to 0 in fp32 (below ~1e-45)


def far_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images near +e1, titles near -e1 (fp64, unit rows): every image-title distance^2 is ~4."""
    g = torch.Generator().manual_seed(seed)
    e1 = F.one_hot(torch.tensor(0), D).double()
    img = F.normalize(e1 + 0.05 * torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(-e1 + 0.05 * torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def align_uniform_ref(img: torch.Tensor, txt: torch.Tensor, t: float) -> torch.Tensor:
    """fp64, from the definition: mean ||x_i - y_i||^2 + log mean_{i != j} exp(-t ||x_i - y_j||^2)."""
    n = img.shape[0]
    pairs = torch.exp(-t * torch.cdist(img, txt).pow(2)) * (1 - torch.eye(n, dtype=img.dtype))
    return (img - txt).pow(2).sum(1).mean() + torch.log(pairs.sum() / (n * (n - 1)))


def test_align_uniform_is_exact_for_a_large_t_on_one_process():
    """fp32 features, t=50, pairs ~antipodal: value and gradients match the fp64 definition
    (was -inf: the fp32 sum of exp(-t d^2) underflowed to 0)."""
    from vutrain.losses import AlignUniformLoss

    img, txt = far_pairs(8)
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    want = align_uniform_ref(x, y, HIGH_T)
    want.backward()
    assert torch.isfinite(want) and want < -150  # the regime where fp32 exp underflows
    x32, y32 = img.float().requires_grad_(), txt.float().requires_grad_()
    loss_fn = AlignUniformLoss(t=HIGH_T)
    got = loss_fn(x32, y32)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y32.grad.double(), y.grad, rtol=1e-3, atol=1e-4)
    uniform = want.detach() - (img - txt).pow(2).sum(1).mean()
    torch.testing.assert_close(loss_fn.last_terms["uniform"].double(), uniform, rtol=1e-5, atol=1e-4)


# -- per-rank work ------------------------------------------------------------------------------


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(IN, D), nn.Linear(IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(1.2))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, y):
        img, txt = F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


class GradsOnly:
    """engine.backward/step without an optimizer, accumulating 2 micro-batches per step."""

    def gradient_accumulation_steps(self):
        return 2

    def backward(self, loss, scale_wrt_gas=True):
        (loss / 2 if scale_wrt_gas else loss).backward()

    def step(self):
        pass


def tag_sets(rank: int) -> list[torch.Tensor]:
    """This rank's two micro-batches of id sets (3 and 2 rows, widths 1 and 3, -1 padded); tag 7
    is shared within rank 0 and with rank 1, tag 9 across micro-batches of rank 1."""
    if rank == 0:
        return [torch.tensor([[7], [-1], [8]]), torch.tensor([[7, 8, -1], [-1, -1, -1]])]
    return [torch.tensor([[9], [7], [-1]]), torch.tensor([[11, 9, 12], [13, -1, -1]])]


def class_ids(rank: int) -> list[torch.Tensor]:
    return (
        [torch.tensor([0, -1, 1]), torch.tensor([2, 0])]
        if rank == 0
        else [
            torch.tensor([1, 3, -1]),
            torch.tensor([3, 4]),
        ]
    )


# (loss name, build_loss kwargs, labels of one rank's micro-batches)
GC_CASES = [
    ("clip", dict(), tag_sets),
    ("siglip", dict(bidir=True), class_ids),
    ("align_uniform", dict(t=HIGH_T), None),
]


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _rows(rank: int) -> slice:
    return slice(rank * B, (rank + 1) * B)


def _gradcache_grads(rank, world, x_all, y_all):
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import build_loss
    from vutrain.losses.positives import concat_labels

    x, y = x_all[_rows(rank)], y_all[_rows(rank)]
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]  # a micro size of 3 does not divide 5
    out = []
    for name, kw, labels in GC_CASES:
        model = TwoTower().double()
        fn = build_loss(name, rank=rank, world_size=world, **kw)
        extra = {"labels": concat_labels(labels(rank))} if labels else {}
        gradcache_step(
            GradsOnly(),
            micro,
            lambda mb, model=model: model(*mb),
            lambda i, t, s, b, fn=fn, extra=extra: fn(i, t, s, b, **extra),
        )
        out.append(
            {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
        )
    return out


def _align_uniform_far(rank, world, img, txt):
    from vutrain.losses import AlignUniformLoss

    x = img[_rows(rank)].float().requires_grad_()
    y = txt[_rows(rank)].float().requires_grad_()
    loss = AlignUniformLoss(rank=rank, world_size=world, t=HIGH_T)(x, y)
    loss.backward()
    return loss.detach(), x.grad, y.grad


def _world2(rank, world, x_in, y_in, img, txt):
    return _gradcache_grads(rank, world, x_in, y_in), _align_uniform_far(rank, world, img, txt)


@pytest.fixture(scope="module")
def world2():
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(WORLD * B, IN, generator=g, dtype=torch.float64)
    y_in = torch.randn(WORLD * B, IN, generator=g, dtype=torch.float64)
    img, txt = far_pairs(WORLD * B, seed=2)
    return (x_in, y_in, img, txt), run_distributed(_world2, WORLD, x_in, y_in, img, txt)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(GC_CASES)), ids=[c[0] for c in GC_CASES])
def test_gradcache_with_unequal_micro_batches_equals_the_whole_batch(world2, case):
    """2 ranks x micro-batches of 3 + 2 rows: rank-averaged parameter gradients == one process's
    gradients of the loss over all 10 samples (tags concatenated across micro-batches and ranks)."""
    from vutrain.losses import build_loss
    from vutrain.losses.positives import concat_labels

    (x_in, y_in, _, _), res = world2
    name, kw, labels = GC_CASES[case]
    model = TwoTower().double()
    extra = {}
    if labels:
        extra["labels"] = concat_labels([concat_labels(labels(r)) for r in range(WORLD)])
    loss = build_loss(name, rank=0, world_size=1, **kw)(*model(x_in, y_in), **extra)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        got = sum(r[0][case][n] for r in res) / WORLD
        torch.testing.assert_close(got, _grad(p), **TOL64, msg=n)


def test_align_uniform_across_ranks_is_exact_for_a_large_t(world2):
    """fp32 on 2 ranks, t=50, far pairs: mean of the per-rank losses is the fp64 global loss and
    each rank's feature gradient is W times its slice of the global gradient (was -inf)."""
    (_, _, img, txt), res = world2
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    want = align_uniform_ref(x, y, HIGH_T)
    want.backward()
    losses = [r[1][0] for r in res]
    assert all(torch.isfinite(v) for v in losses)
    torch.testing.assert_close(sum(v.double() for v in losses) / WORLD, want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        torch.cat([r[1][1] for r in res]).double() / WORLD, x.grad, rtol=1e-3, atol=1e-4
    )
    torch.testing.assert_close(
        torch.cat([r[1][2] for r in res]).double() / WORLD, y.grad, rtol=1e-3, atol=1e-4
    )


def test_gradcache_bench_runs_a_batch_that_micro_does_not_divide():
    """Batch 5 in micro-batches of 2 (2 + 2 + 1) and a micro of 8 over batch 5: one GradCache step
    each, with the loss of the plain step on the same inputs."""
    from vutrain.gradcache_bench import run_one

    plain = run_one(5, 2, "plain", "tiny", "cpu")
    for micro in (2, 8):
        row = run_one(5, micro, "gradcache", "tiny", "cpu")
        assert row["micro"] == min(micro, 5)
        assert math.isclose(row["loss"], plain["loss"], abs_tol=1e-4), (micro, row, plain)


@pytest.mark.parametrize(
    "argv, says",
    [(["--micro", "0"], "--micro must be a positive"), (["--batches", "64,x"], "--batches must be positive")],
)
def test_gradcache_bench_rejects_bad_sizes_in_one_line(argv, says, capsys):
    """A zero micro or a non-numeric batch: exit 2 with a usage line that names the option."""
    from vutrain.gradcache_bench import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_the_config_takes_a_large_uniform_t_now_that_the_term_is_exact():
    """The config capped loss.uniform_t at 20 because the fp32 sum underflowed; the log-sum-exp form
    is exact for any t, so the cap is gone (t > 0 is still required)."""
    from vutrain.config import ConfigError, load_config

    base = ["data.train_shards=/x/{0..1}.tar", "loss.name=align_uniform"]
    assert load_config("tiny", [*base, "loss.uniform_t=60"]).loss.uniform_t == 60
    with pytest.raises(ConfigError, match="loss.uniform_t must be > 0"):
        load_config("tiny", [*base, "loss.uniform_t=0"])
