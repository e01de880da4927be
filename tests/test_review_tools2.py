"""Developer tools, second review: what `count_step_ops.py` and `host_python_time.py` report matches
what one step does, and `host_python_time.py` refuses counts it cannot use in one usage line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import host_python_time  # noqa: E402
from host_python_time import package_of  # noqa: E402


def test_host_time_of_installed_packages_goes_to_their_top_folder():
    """A venv inside a clone named `vutrain` (what `git clone` makes) put every installed package
    that is not listed (numpy, tqdm, ...) on vutrain's row, open_clip's side included."""
    clone_venv = "/home/me/vutrain/.venv/lib/python3.11/site-packages"
    assert package_of(f"{clone_venv}/numpy/_core/fromnumeric.py") == "other"
    assert package_of(f"{clone_venv}/six.py") == "other"
    assert package_of(f"{clone_venv}/open_clip/model.py") == "open_clip"
    assert package_of("/home/me/torch/.venv/lib/python3.11/site-packages/tqdm/std.py") == "other"
    # a subpackage named like another row stays with its package
    assert package_of(f"{clone_venv}/transformers/kernels/falcon_mamba/x.py") == "transformers"
    assert package_of("/usr/lib/python3/dist-packages/deepspeed/runtime/engine.py") == "deepspeed"
    # the repository's own code (an editable install) is still found by its folder
    assert package_of("/home/me/vutrain/vutrain/trainer.py") == "vutrain"
    assert package_of("/home/me/vutrain/kernels/clip_loss.py") == "kernels"


@pytest.mark.parametrize(
    "flag,value,says",
    [
        ("--steps", "0", "--steps must be >= 1, got 0"),
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--warmup", "-1", "--warmup must be >= 0, got -1"),
        ("--zero-stages", "1,x", "--zero-stages takes ZeRO stages 0-3"),
        ("--zero-stages", "1,4", "--zero-stages takes ZeRO stages 0-3"),
    ],
)
def test_host_python_time_refuses_a_count_it_cannot_use(capsys, flag, value, says):
    # --steps 0 divided by zero and --zero-stages 1,x failed in int(), each in a traceback after
    # building the trainers
    with pytest.raises(SystemExit) as exit_info:
        host_python_time.main([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and says in err[-1]


def test_count_step_ops_counts_every_micro_batch_of_the_step():
    """With train.grad_accum_steps=2 (plain accumulation) forward and backward run twice a step;
    each call replaced the phase's counter, so the step's count was the last micro-batch's."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import count_step_ops\n"
        "for accum in (1, 2):\n"
        "    count_step_ops.main(['--precision', 'fp32', '--set', 'train.accumulation=plain',\n"
        "                         '--set', f'train.grad_accum_steps={accum}'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VUTRAIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert one["forward with the loss"] > 0
    assert two["forward with the loss"] == 2 * one["forward with the loss"], (one, two)
    assert two["backward"] >= 2 * one["backward"], (one, two)
