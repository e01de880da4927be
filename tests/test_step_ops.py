"""What one training step dispatches, counted by `tools/count_step_ops.py` (one rank, tiny preset, bf16).

On a GPU nearly every compute op is a kernel launch, so ops that scale with the number of
parameters are what made the optimizer phase 25% of a ViT-B/32 step (issue 9). Checked here:
the optimizer step dispatches the same number of ops whether half the tensors are frozen or not
(nothing per parameter: multi-tensor AdamW and the multi-tensor gradient norm of
vutrain/grad_norm.py; before, DeepSpeed's norm cast and normed each gradient), and ZeRO-1's
backward no more than ZeRO-2's (it copied every gradient into a contiguous partition buffer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every configuration the tests read, counted in ONE process (a fresh interpreter per run cost
# 8 s of imports each; the counts are the same either way, checked by hand for all seven).
CONFIGS = [(stage, override) for stage in (1, 2, 3) for override in ("", "model.lock_text=true")]
CONFIGS.append((2, "train.grad_accum_steps=2"))


@pytest.fixture(scope="module")
def counts() -> dict:
    argvs = [
        ["--preset", "tiny", "--zero-stage", str(stage), *(["--set", override] if override else [])]
        for stage, override in CONFIGS
    ]
    code = (
        f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tools')!r})\n"
        "import count_step_ops\n"
        f"for argv in {argvs!r}:\n"
        "    count_step_ops.main(argv)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VUTRAIN_DEVICE": "cpu"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(CONFIGS), r.stdout[-3000:]
    return dict(zip(CONFIGS, results))


@pytest.mark.slow  # seven one-rank training runs of 3 steps, in one process
def test_no_op_per_parameter_in_the_optimizer_step_and_no_gradient_copy_at_zero1(counts):
    runs = {stage: (counts[stage, ""], counts[stage, "model.lock_text=true"]) for stage in (1, 2, 3)}
    for stage, (full, half) in runs.items():
        assert full["trainable_tensors"] >= half["trainable_tensors"] + 40, (full, half)
        assert full["optimizer step"] == half["optimizer step"], f"ZeRO-{stage}: {full} vs {half}"
    assert runs[1][0]["backward"] <= runs[2][0]["backward"], runs


@pytest.mark.slow  # the same runs
def test_one_micro_batch_per_step_masks_at_the_step_not_per_parameter(counts):
    """bf16, ZeRO-1/2, one micro-batch per step: the non-finite guard's verdict zeroes the flat
    gradients at the step (grad_clip.mask_at_step: a masked_fill_ per parameter group) instead of
    a masked_fill per parameter in backward. With two micro-batches per step (a skipped one must
    not wipe the other's gradients) and at ZeRO-3 the per-parameter masks stay."""
    for stage in (1, 2):
        one = counts[stage, ""]
        assert one["backward: guard masks"] == 0, f"ZeRO-{stage}: {one}"
    for two in (counts[2, "train.grad_accum_steps=2"], counts[3, ""]):
        assert two["backward: guard masks"] >= two["trainable_tensors"] - 2, two
