"""Developer tools and the data benchmark, third review: GradCache's phases in count_step_ops,
profile_step's record, and the counts `python -m vutrain.bench data` cannot use."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "VUTRAIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def _run_code(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow  # a one-rank training run of 3 steps
def test_count_step_ops_counts_the_gradcache_replay_in_a_phase_of_its_own():
    """Under GradCache (two micro-batches) the step never calls forward_loss: the no-grad forwards,
    the loss and the replayed forwards were counted in no phase, and the phases did not add up."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import count_step_ops\n"
        "from vutrain.gradcache import GradCache\n"
        "before = (GradCache.forward, GradCache.backward)\n"
        "count_step_ops.main(['--precision', 'fp32', '--set', 'train.accumulation=gradcache',\n"
        "                     '--set', 'train.grad_accum_steps=2'])\n"
        "print('restored', (GradCache.forward, GradCache.backward) == before)\n"
    )
    done = _run_code(code)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    phases = ["forward with the loss", "replayed forward (GradCache)", "backward", "optimizer step", "other"]
    assert all(result.get(phase, 0) > 0 for phase in phases[:4]), result
    # two micro-batches replayed with autograd: at least as many ops as one forward without it
    assert result["replayed forward (GradCache)"] >= result["forward with the loss"] / 2, result
    assert result["step"] == sum(result.get(phase, 0) for phase in phases), result
    assert "restored True" in done.stdout  # the tool's labels do not outlive its run


@pytest.mark.slow  # a one-rank training run of 2 steps
def test_profile_step_records_its_configuration_and_a_command_that_reruns_it():
    """The record lacked hidden_act, compile_mode and workers, and its command was the caller's
    sys.argv: here the wrapper's own arguments, nothing profile_step.py takes."""
    argv = ["--warmup", "1", "--steps", "1", "--batch-size", "4", "--workers", "0", "--hidden-act", "gelu"]
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "sys.argv = ['wrapper.py', '--wrapper-flag']\n"
        "import profile_step\n"
        f"sys.exit(profile_step.main({argv!r}))\n"
    )
    record = json.loads(_run_code(code).stdout.strip().splitlines()[-1])
    assert record["hidden_act"] == "gelu" and record["workers"] == 0 and record["warmup"] == 1, record
    assert record["compile_mode"] == "default" and record["compiled"] is False, record
    words = shlex.split(record["command"])
    assert words[:2] == ["python", "tools/profile_step.py"] and "--wrapper-flag" not in words, words
    given = dict(zip(words[2::2], words[3::2]))
    for flag, value in zip(argv[::2], argv[1::2]):
        assert given[flag] == value, (flag, words)
    assert given["--preset"] == record["preset"] and given["--precision"] == record["precision"], words


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--prefetch-factor", "0"),  # a ValueError traceback from the stream
        ("--batches", "-1"),  # negative samples/s reported
        ("--image-size", "0"),  # a ValueError traceback from the preprocessing
        ("--samples-per-worker", "0"),
        ("--context-length", "0"),
        ("--shuffle-buffer", "-1"),
        ("--decode-seconds", "-1"),
    ],
)
def test_bench_data_refuses_a_count_it_cannot_use_in_one_usage_line(capsys, flag, value):
    from vutrain import bench_data

    with pytest.raises(SystemExit) as exit_:
        bench_data.main(["--shards", str(REPO / "no-such-dir" / "{0..1}.tar"), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m vutrain.bench data: error: {flag} must be >= "), err


@pytest.mark.parametrize("bad", [{"start": 0}, {"granularity": 0}, {"precision": 1.0}])
def test_largest_batch_refuses_a_search_it_cannot_end(bad):
    """start=0 probed 0, which "fitted", doubled to 0 and probed it again without end; granularity=0
    ran the doubling's probes, then ended in a ZeroDivisionError; precision=1 stopped at the
    doubling's bounds, up to 2x off (bench_compare refuses it too). A `fits` that gives up after
    50 probes stands in for the hang."""
    from vutrain.bench_search import largest_batch

    probed = []

    def fits(size: int) -> bool:
        probed.append(size)
        if len(probed) > 50:
            raise RuntimeError("the search does not end")
        return size <= 100

    with pytest.raises(ValueError, match="largest_batch needs start >= 1"):
        largest_batch(fits, **{"known_fit": 0, "start": 8, "limit": 1000, **bad})
    assert probed == []  # refused before anything was trained
