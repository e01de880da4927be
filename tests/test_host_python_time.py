"""`tools/host_python_time.py`: Python self time per step by package, vutrain's Trainer against
open_clip's step, on CPU at a tiny size (the ViT-B/32 structure is measured by hand: BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from host_python_time import package_of  # noqa: E402


def test_functions_are_attributed_to_their_package():
    site = "/x/lib/python3.11/site-packages"
    assert package_of(f"{site}/deepspeed/runtime/zero/stage_1_and_2.py") == "deepspeed"
    assert package_of(f"{site}/transformers/models/clip/modeling_clip.py") == "transformers"
    assert package_of(f"{site}/torch/nn/modules/module.py") == "torch"
    assert package_of("/repo/vutrain/losses/clip.py") == "vutrain"
    assert package_of(f"{site}/open_clip/transformer.py") == "open_clip"
    assert package_of("~") is None  # a C function: its time is the op's, not Python's
    assert package_of("<frozen importlib._bootstrap>") is None
    assert package_of("/usr/lib/python3.11/functools.py") == "other"


@pytest.mark.slow  # three small training set-ups in a subprocess
def test_profiles_both_sides_and_reports_deepspeeds_share():
    cmd = [sys.executable, os.path.join(REPO, "tools", "host_python_time.py"), "--preset", "vit-b-32"]
    cmd += ["--narrow", "--warmup", "1", "--steps", "1"]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "VUTRAIN_DEVICE": "cpu"}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["narrow"] and record["hidden_act"] == "gelu", record
    rows = {row["variant"]: row for row in record["rows"]}
    assert list(rows) == ["vutrain z1 torch", "vutrain z2 torch", "open_clip"], list(rows)
    for name in ("vutrain z1 torch", "vutrain z2 torch"):
        assert rows[name]["by_package"]["deepspeed"] > 0 and rows[name]["by_package"]["transformers"] > 0
    assert (
        rows["open_clip"]["by_package"]["open_clip"] > 0
        and "deepspeed" not in rows["open_clip"]["by_package"]
    )
    for row in rows.values():
        assert row["python_ms_per_step"] == pytest.approx(sum(row["by_package"].values()))
        assert row["top"] and all(f["ms"] > 0 for f in row["top"])
