"""The engine's gradient norm at ZeRO-0 with fp32 weights (vutrain/grad_norm.py
`report_zero0_grad_norm`), with real DeepSpeed engines from `vutrain.engine.build_engine` (world 1)
and real in-process Trainers.

At train.zero_stage=0 in fp32 or amp_bf16 the engine's optimizer is torch's AdamW, and DeepSpeed's
fp32 clip drops the norm it computes: `engine.get_global_grad_norm()` was None, so
train/grad_norm and train/grad_norm_max were missing from every metrics row. Now the engine reports
the norm before clipping of the gradients the step gets, with clipping on and off, and a NaN gradient's norm
is non-finite (logged inf), not the 0 of the gradients the non-finite zeroing leaves behind.

Also: `trainer.features_for_loss` under amp_bf16 with the loss kernels on CUDA casts each tower's
features to bf16 once. Before, the tower the loss was asked about was cast twice (a second copy).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_grad_norm import CountOps
from test_param_alignment import _odd_model
from training_rows import training_rows


def _norm_of_grads(params) -> float:
    """The L2 norm of the parameters' gradients as ZeRO-0 holds them before the step, in fp64."""
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))


def _record_step_norms(norms: dict):
    """on_trainer hook: norms[step] = the norm of the gradients engine.step() is handed (ZeRO-0
    keeps them in .grad; one micro-batch a step: the step's boundary)."""

    def hook(trainer) -> None:
        engine, inner = trainer.engine, trainer.engine.step
        params = [p for p in engine.module.parameters() if p.requires_grad]

        def step(*args, **kwargs):
            norms[trainer.step + 1] = _norm_of_grads(params)
            return inner(*args, **kwargs)

        engine.step = step

    return hook


def _engine_step(precision: str, grad_clip: float, poison: bool = False) -> tuple[float | None, float]:
    """(engine.get_global_grad_norm() after one step, autograd's norm of that step's gradients)."""
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=2, zero_stage=0, precision=precision, warmup_steps=0, grad_clip=grad_clip
    )
    engine = build_engine(_odd_model(), cfg, 1, torch.device("cpu"))
    img, txt, scale, _ = engine(
        pixel_values=torch.randn(2, 3, 16, 16),
        input_ids=torch.randint(1, 99, (2, 9)),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
    )
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float())
    params = [p for p in engine.module.parameters() if p.requires_grad]
    expected = _norm_of_grads(params)
    if poison:  # a NaN gradient under a finite loss
        params[3].grad[0] = float("nan")
    engine.step()
    norm = engine.get_global_grad_norm()
    return (None if norm is None else float(norm)), expected


@pytest.fixture
def one_rank_group(single_process):
    """The process group of a world of 1 that build_engine's DeepSpeed engine joins."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env({}))


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
@pytest.mark.parametrize("grad_clip", [0.01, 0.0])
def test_zero0_engine_reports_the_norm_before_clipping(one_rank_group, precision, grad_clip):
    """Clip 0.01 (far below the norm, so the norm is the one before clipping) and clip off."""
    norm, expected = _engine_step(precision, grad_clip)
    assert norm is not None, "ZeRO-0 reported no gradient norm"
    assert norm == pytest.approx(expected, rel=1e-4) and norm > 1.0


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_zero0_nan_gradient_norm_is_not_finite(one_rank_group, grad_clip):
    """The norm is taken before grad_clip.zero_nonfinite_at_step zeroes the step: NaN, read as inf."""
    norm, _ = _engine_step("fp32", grad_clip, poison=True)
    # Trainer._grad_norm logs a non-finite norm as inf (tests/test_review_metrics.py); before, None.
    assert norm is not None and not math.isfinite(norm), norm


def test_zero0_fp32_run_logs_grad_norm_columns(tiny_shards, tmp_path, single_process):
    """A real run at ZeRO-0 fp32, log_every 2: each row has train/grad_norm, the norm of the
    gradients its logging step's optimizer got (rel 1e-4), and train/grad_norm_max, the larger of
    the interval's two norms."""
    norms: dict = {}
    rows = training_rows(
        tiny_shards,
        str(tmp_path / "run"),
        steps=4,
        on_trainer=_record_step_norms(norms),
        train__zero_stage=0,
        train__precision="fp32",
        train__log_every=2,
    )
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        step = row["step"]
        assert row["train/grad_norm"] == pytest.approx(norms[step], rel=1e-4), (row, norms)
        assert row["train/grad_norm_max"] == pytest.approx(max(norms[step - 1], norms[step]), rel=1e-4)


@pytest.mark.parametrize("towers", [("image", "text"), ("text",)])
def test_kernel_features_are_cast_once(towers):
    """amp_bf16 on CUDA, kernels chosen (loss.backend=triton; the dtype choice reads the device
    type given, so CPU tensors serve): one cast per present tower, the values and the autograd
    path as before. Before: 3 casts for two towers, 2 for GradCache's text tower alone."""
    from vutrain.losses import ClipLoss
    from vutrain.trainer import features_for_loss

    img = torch.randn(4, 8, requires_grad=True) if "image" in towers else None
    txt = torch.randn(4, 8, requires_grad=True)
    with CountOps() as mode:
        out = features_for_loss(ClipLoss(backend="triton"), img, txt, None, None, "cuda", "amp_bf16")
    assert mode.ops == len(towers), mode.ops
    for got, given in zip(out, (img, txt)):
        if given is None:
            assert got is None
            continue
        assert got.dtype == torch.bfloat16 and torch.equal(got, given.bfloat16())
        (grad,) = torch.autograd.grad(got.float().sum(), given)
        assert torch.equal(grad, torch.ones_like(given))
