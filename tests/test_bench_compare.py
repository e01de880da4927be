"""`python -m vutrain.bench --compare open_clip` at the tiny size on CPU, open_clip's real modules
loaded without its package __init__ (torchvision cannot be installed beside this torch), and the
largest-batch search.

The search is checked against a known capacity: `fits(b)` really allocates a tensor of `b` rows
in a bounded budget and raises torch.OutOfMemoryError past it, as the device does.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from vutrain.bench_search import largest_batch

import train_runner as tr

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (make test installs it)",
)


class Budget:
    """A memory budget of `capacity` rows: allocating more raises torch.OutOfMemoryError."""

    def __init__(self, capacity: int):
        self.capacity, self.calls = capacity, []

    def __call__(self, rows: int) -> bool:
        self.calls.append(rows)
        try:
            if rows > self.capacity:
                raise torch.OutOfMemoryError(f"tried to allocate {rows} rows of {self.capacity}")
            torch.empty(rows, 4)
        except torch.OutOfMemoryError:
            return False
        return True


@pytest.mark.parametrize("capacity", [1, 200, 1000, 3000, 4096, 5000])
def test_search_brackets_the_capacity(capacity):
    """The result fits, and the smallest failing size is within the stated precision above it."""
    fits = Budget(capacity)
    found = largest_batch(fits, known_fit=0, start=256, limit=32768, granularity=8, precision=0.0625)
    assert not found["capped"]
    assert found["largest_batch"] <= capacity < found["failed_at"]
    assert found["failed_at"] - found["largest_batch"] <= max(8, found["largest_batch"] * 0.0625)
    assert [p[0] for p in found["probes"]] == fits.calls
    assert all(ok == (size <= capacity) for size, ok in found["probes"])


def test_search_starts_above_a_known_fit_and_reports_the_cap():
    fits = Budget(10**6)
    found = largest_batch(fits, known_fit=1024, start=256, limit=5000)
    assert fits.calls == [2048, 4096, 5000]
    assert found == {
        "largest_batch": 5000,
        "capped": True,
        "failed_at": None,
        "stopped": False,
        "probes": [[2048, True], [4096, True], [5000, True]],
    }
    assert largest_batch(Budget(0), known_fit=0, start=256, limit=4096)["largest_batch"] == 0


def test_search_stops_on_request_with_the_bounds_found_so_far():
    """A time budget ends the search between probes; what was proven stays in the result."""
    fits = Budget(3000)
    found = largest_batch(fits, known_fit=256, start=256, limit=32768, stop=lambda: len(fits.calls) >= 5)
    assert found["stopped"] and len(found["probes"]) == 5
    assert found["largest_batch"] <= 3000 < found["failed_at"]
    assert found["largest_batch"] == max(size for size, ok in found["probes"] if ok)


def test_search_that_fails_otherwise_keeps_what_it_proved():
    """A failure other than out-of-memory (a driver error, a bug at one size) ends the search; the
    sizes that trained before it stay in the result, marked with the error, not thrown away."""
    budget = Budget(3000)

    def fits(rows):
        if len(budget.calls) == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return budget(rows)

    found = largest_batch(fits, known_fit=256, start=256, limit=32768)
    assert found["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert found["probes"] == [[512, True], [1024, True], [2048, True], [4096, False]]
    assert (found["largest_batch"], found["failed_at"], found["capped"]) == (2048, 4096, False)


def _largest(variant, side, batch, ckpt=False, **flags):
    return {"variant": variant, "side": side, "grad_ckpt": ckpt, "largest_batch": batch, **flags}


def test_largest_batch_target_is_judged_against_open_clip_and_like_for_like():
    """The issue's target sets vutrain's best against open_clip as it ships; the checkpointed
    pair is shown beside it (information), and a search cut short never gives a FAIL."""
    from vutrain.bench_report import judge_targets

    largest = [
        _largest("open_clip", "open_clip", 1000),
        _largest("open_clip ckpt", "open_clip", 3000, ckpt=True),
        _largest("vutrain z2 torch", "vutrain", 1500),
        _largest("vutrain z2 torch ckpt", "vutrain", 4000, ckpt=True),
    ]
    got = {t["target"]: t for t in judge_targets([], largest, on_gpu=True)}
    assert got["largest batch >= 2.0x open_clip's"] == {
        "target": "largest batch >= 2.0x open_clip's",
        "value": 4.0,
        "by": "vutrain z2 torch ckpt",
        "result": "PASS",
    }
    like = got["largest batch, both with gradient checkpointing (information)"]
    assert (like["value"], like["by"], like["result"]) == (1.333, "vutrain z2 torch ckpt", "INFO FAIL")

    largest[3] = _largest("vutrain z2 torch ckpt", "vutrain", 4000, ckpt=True, error="RuntimeError: x")
    largest[1] = _largest("open_clip ckpt", "open_clip", 3000, ckpt=True, stopped=True)
    got = {t["target"]: t["result"] for t in judge_targets([], largest, on_gpu=True)}
    assert got["largest batch >= 2.0x open_clip's"] == "PASS"
    assert got["largest batch, both with gradient checkpointing (information)"].startswith("INFO UNDECIDED")
    largest[0]["error"] = "RuntimeError: y"
    got = {t["target"]: t["result"] for t in judge_targets([], largest, on_gpu=True)}
    assert got["largest batch >= 2.0x open_clip's"].startswith("UNDECIDED (open_clip's")
    assert judge_targets([], largest, on_gpu=False) == []


def test_speed_is_judged_like_for_like_and_missing_targets_say_so():
    """Compiled vutrain was judged against open_clip as it ships: a compiled-vs-eager PASS (1.8x
    here) beside a like-for-like 1.2x. The target is now eager against eager and compiled against
    compiled; compiled against eager is information. A target that cannot be judged (a row
    missing or errored, a batch size not run, no search) is MISSING, never left out."""
    from vutrain.bench_report import add_ratios, judge_targets

    def row(variant, side, speed, compiled=False, **extra):
        return {
            "variant": variant,
            "side": side,
            "batch_size": 256,
            "samples_per_s": speed,
            "compiled": compiled,
            "precision": "bf16" if side == "vutrain" else "amp_bf16",
            **extra,
        }

    rows = [
        row("open_clip", "open_clip", 1000.0),
        row("open_clip compile", "open_clip", 1500.0, compiled=True),
        row("vutrain z2 triton", "vutrain", 900.0),
        row("vutrain z2 triton compile", "vutrain", 1800.0, compiled=True),
        row("vutrain z1 triton compile", "vutrain", 1700.0, compiled=True),
    ]
    add_ratios(rows, [])
    got = {t["target"]: t for t in judge_targets(rows, [], on_gpu=True)}
    eager = got["samples/s at batch 256 >= 1.1x open_clip"]
    assert (eager["value"], eager["by"], eager["result"]) == (0.9, "vutrain z2 triton", "FAIL")
    assert eager["precision"] == "vutrain bf16 vs open_clip amp_bf16"
    both = got["samples/s at batch 256 >= 1.1x open_clip, both compiled"]
    assert (both["value"], both["by"], both["result"]) == (1.2, "vutrain z2 triton compile", "PASS")
    info = got["samples/s at batch 256, vutrain compiled vs open_clip as it ships (information)"]
    assert (info["value"], info["result"]) == (1.8, "INFO PASS")
    assert got["samples/s at batch 1024 >= 1.1x open_clip"]["result"] == "MISSING (batch 1024 not run)"
    assert got["largest batch >= 2.0x open_clip's"]["result"] == "MISSING (not searched)"

    without = {t["target"]: t["result"] for t in judge_targets(rows[:1] + rows[2:], [], on_gpu=True)}
    assert without["samples/s at batch 256 >= 1.1x open_clip, both compiled"] == (
        "MISSING (open_clip: row missing)"
    )
    crashed = [dict(r, error="RuntimeError: x") if r["variant"] == "open_clip" else r for r in rows]
    got = {t["target"]: t["result"] for t in judge_targets(crashed, [], on_gpu=True)}
    assert got["samples/s at batch 256 >= 1.1x open_clip"] == "MISSING (open_clip: RuntimeError: x)"


def test_compile_adds_compiled_twins_after_the_baseline():
    from vutrain.bench_compare import parse_args, variants

    args = parse_args(["--compare", "open_clip", "--zero-stages", "2", "--loss-backends", "triton"])
    assert [v.label for v in variants(args)] == [
        "vutrain z2 triton",
        "open_clip",
        "open_clip ckpt",
        "vutrain z2 triton ckpt",
    ]
    args = parse_args(
        ["--compare", "open_clip", "--zero-stages", "2", "--loss-backends", "triton"]
        + ["--grad-ckpt", "off", "--compile", "both"]
    )
    assert [v.label for v in variants(args)] == [
        "vutrain z2 triton",
        "open_clip",
        "open_clip compile",
        "vutrain z2 triton compile",
    ]


@needs_open_clip
@pytest.mark.slow
def test_compare_compiled_configurations_on_cpu(tmp_path):
    """--compile both: vutrain's train.compile and open_clip's torch.compile'd model train side by
    side (aot_eager here: the capture and autograd of the real compiler, none of its codegen)."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4"]
    argv += ["--zero-stages", "2", "--loss-backends", "torch", "--grad-ckpt", "off", "--steps", "1"]
    argv += ["--warmup", "1", "--pool", "8", "--max-batch", "0", "--compile", "both"]
    argv += ["--compile-backend", "aot_eager", "--out", str(out)]
    proc = tr.run_module("vutrain.bench", argv)
    assert proc.returncode == 0, tr.describe(proc)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["compiled"]) for r in rows] == [
        ("vutrain z2 torch", False),
        ("open_clip", False),
        ("open_clip compile", True),
        ("vutrain z2 torch compile", True),
    ]
    assert all(r["samples_per_s"] > 0 and "error" not in r for r in rows)


def test_rounds_keep_the_median_speed_the_largest_peak_and_any_error():
    from vutrain.bench_compare import median_rows

    row = {"variant": "open_clip", "batch_size": 8, "step_time_s": 1.0}
    measured = [dict(row, samples_per_s=s, peak_memory_gib=p) for s, p in ((10, 1.0), (30, 1.5), (20, 1.2))]
    measured += [
        {"variant": "vutrain z2 torch", "batch_size": 8, "error": "out of memory: x", "oom": True},
        {
            "variant": "vutrain z2 torch",
            "batch_size": 8,
            "samples_per_s": 5.0,
            "step_time_s": 1.0,
            "peak_memory_gib": None,
        },
    ]
    merged = {r["variant"]: r for r in median_rows(measured)}
    assert merged["open_clip"]["samples_per_s"] == 20 and merged["open_clip"]["peak_memory_gib"] == 1.5
    assert merged["open_clip"]["samples_per_s_rounds"] == [10, 30, 20] and merged["open_clip"]["rounds"] == 3
    assert merged["vutrain z2 torch"]["error"] == "out of memory: x"


def test_open_clip_gets_normalised_fp32_pixels_from_either_stream_format():
    """uint8 batches (normalised on the device by vutrain) reach open_clip as its loader gives them."""
    from vutrain.bench_compare import openclip_pixels
    from vutrain.model import OPENAI_MEAN, OPENAI_STD

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    got = openclip_pixels(pixels, OPENAI_MEAN, OPENAI_STD)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[1, 2], (pixels[1, 2].float() / 255 - OPENAI_MEAN[2]) / OPENAI_STD[2])
    already = torch.randn(2, 3, 4, 4)
    assert torch.equal(openclip_pixels(already, OPENAI_MEAN, OPENAI_STD), already)


@needs_open_clip
def test_open_clip_real_modules_and_loss_agree_with_vutrain():
    """open_clip's own CLIP/ClipLoss load (no torchvision here); its loss equals vutrain's."""
    from vutrain.bench_openclip import load_open_clip, model_config, openclip_activation
    from vutrain.losses import ClipLoss

    oc = load_open_clip()
    assert inspect.getsourcefile(oc.CLIP).startswith(oc.package_dir)
    assert inspect.getsourcefile(oc.ClipLoss) == os.path.join(oc.package_dir, "loss.py")
    if oc.source == "modules":  # the torchvision placeholder existed only while utils.py ran
        assert "torchvision" not in sys.modules
    cfg = model_config("vit-b-32", 224, 4096, 77, oc)  # checked against open_clip's ViT-B-32.json
    assert cfg["vision_cfg"]["width"] == 768 and cfg["text_cfg"]["vocab_size"] == 4096
    # vutrain's preset trains open_clip's MLP activation: ViT-B-32 from scratch uses nn.GELU (exact)
    assert openclip_activation("vit-b-32", oc) == openclip_activation("tiny", oc) == "gelu"
    theirs_model = oc.CLIP(**model_config("tiny", 64, 300, 32, oc))
    assert {type(m).__name__ for m in theirs_model.modules() if "GELU" in type(m).__name__} == {"GELU"}

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 32), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(12, 32), dim=-1).requires_grad_()
    scale = torch.tensor(14.3)
    theirs = oc.ClipLoss()(img, txt, scale)
    ours = ClipLoss()(img, txt, scale)
    g_theirs = torch.autograd.grad(theirs, (img, txt))
    g_ours = torch.autograd.grad(ours, (img, txt))
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


@needs_open_clip
@pytest.mark.slow
def test_compare_tiny_on_cpu(tmp_path):
    """Both sides train in one process on the same batches; rows, ratios, search, JSON and PNG.

    A configuration that cannot be built (an unknown loss backend) is recorded with its error and
    makes the exit code 1, while every other configuration is still measured.
    """
    out = tmp_path / "compare.json"
    argv = [
        "--compare",
        "open_clip",
        "--preset",
        "tiny",
        "--precision",
        "fp32",
        "--batch-sizes",
        "4,8",
        "--zero-stages",
        "1,2",
        "--loss-backends",
        "torch,nope",
        "--grad-ckpt",
        "off",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--pool",
        "16",
        "--max-batch",
        "16",
        "--search",
        "open_clip,vutrain z2 torch",
        "--out",
        str(out),
    ]
    proc = tr.run_module("vutrain.bench", argv)
    assert proc.returncode == 1, tr.describe(proc)
    result = json.loads(out.read_text())
    # open_clip early: a run cut short by a time limit still has the baseline of its ratios
    labels = ["vutrain z1 torch", "open_clip", "vutrain z1 nope", "vutrain z2 torch", "vutrain z2 nope"]
    got = [(r["variant"], r["batch_size"]) for r in result["rows"]]
    assert got == [(v, b) for v in labels for b in (4, 8)]
    failed = [r for r in result["rows"] if "error" in r]
    assert {r["variant"] for r in failed} == {"vutrain z1 nope", "vutrain z2 nope"}
    assert all("loss.backend" in r["error"] and not r["oom"] for r in failed)
    base = {r["batch_size"]: r["samples_per_s"] for r in result["rows"] if r["variant"] == "open_clip"}
    for row in (r for r in result["rows"] if "error" not in r):
        assert row["samples_per_s"] > 0 and row["step_time_s"] > 0
        assert row["peak_memory_gib"] is None  # no device memory on the CPU: not made up
        # one extra step counted at the first batch size: on CPU every host read (the optimizers'
        # step counters at least)
        if row["batch_size"] == 4:
            assert row["host_reads_per_step"] >= sum(row["host_read_sites"].values()) > 0
        else:
            assert "host_reads_per_step" not in row
        assert row["ratio_to_open_clip"] == pytest.approx(row["samples_per_s"] / base[row["batch_size"]])
    assert [(e["variant"], e["largest_batch"], e["capped"]) for e in result["largest"]] == [
        ("open_clip", 16, True),
        ("vutrain z2 torch", 16, True),
    ]
    assert result["largest"][1]["probes"] == [[16, True]]  # doubling from 8, the largest batch phase 1 ran
    assert result["open_clip"]["model_cfg"]["vision_cfg"] == {
        "image_size": 64,
        "layers": 3,
        "width": 128,
        "patch_size": 8,
        "head_width": 32,
    }
    assert result["targets"] == [] and "targets: judged on a GPU only" in proc.stdout
    assert {(r["side"], r["precision"]) for r in result["rows"]} == {
        ("vutrain", "fp32"),
        ("open_clip", "fp32"),
    }
    assert "precision: vutrain fp32, open_clip fp32" in proc.stdout
    assert result["hidden_act"] == "gelu" and "MLP activation on both sides: gelu" in proc.stdout
    assert "| vutrain z2 torch | 8 |" in proc.stdout and "| open_clip | 8 |" in proc.stdout
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _start_compare(argv: list[str], out) -> subprocess.Popen:
    """`python -m vutrain.bench ARGV --out OUT` in the background, its output a text pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "vutrain.bench", *argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=tr.env(),
        cwd=tr.REPO,
    )


def _sigterm_after(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """SIGTERM `proc` after the output line holding `marker` (gpu_bench.sh's time limit); returns
    the output after it, and checks the exit code a SIGTERM must give (143)."""
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
        proc.terminate()
        rest = proc.stdout.read()
        assert proc.wait(timeout=timeout) == 128 + 15, "".join(seen)[-3000:] + rest[-3000:]
    finally:
        proc.kill()
    return rest


@needs_open_clip
@pytest.mark.slow
def test_compare_stopped_by_a_time_limit_reports_what_it_measured(tmp_path):
    """launch/gpu_bench.sh ends the step with SIGTERM at its limit: the run reports the rows it
    has (JSON, marked partial, and the figure) and exits 143, instead of dying mid-search."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4"]
    argv += ["--zero-stages", "2", "--loss-backends", "torch", "--grad-ckpt", "off", "--steps", "1"]
    argv += ["--warmup", "1", "--pool", "16", "--max-batch", "4096", "--search", "vutrain z2 torch"]
    # Stopped inside the largest-batch search, after phase 1.
    rest = _sigterm_after(_start_compare(argv, out), "vutrain z2 torch: batch")
    result = json.loads(out.read_text())
    assert result["partial"] is True and "stopped by SIGTERM" in rest
    assert [r["variant"] for r in result["rows"]] == ["vutrain z2 torch", "open_clip"]
    assert all("ratio_to_open_clip" in r for r in result["rows"])
    assert out.with_suffix(".png").is_file()


@needs_open_clip
def test_compare_stopped_mid_configuration_keeps_its_measured_batch_sizes(tmp_path):
    """The compare step's limit can fall while a configuration measures its second batch size:
    the rows of its first were kept only once the whole configuration was done, so the report
    lost a batch-256 row already measured."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4,512"]
    # 12 steps: at batch 512 (about 100x the work of batch 4) they outlast the signal's way from
    # the printed row to the process by far; each step more only lengthens batch 4.
    argv += ["--zero-stages", "2", "--loss-backends", "torch", "--grad-ckpt", "off", "--steps", "12"]
    argv += ["--warmup", "1", "--pool", "8", "--search", "none"]
    # Batch 4 measured: the signal comes while batch 512 runs.
    rest = _sigterm_after(_start_compare(argv, out), "| vutrain z2 torch | 4 |", timeout=120)
    result = json.loads(out.read_text())
    assert result["partial"] is True
    assert [(r["variant"], r["batch_size"], "error" in r) for r in result["rows"]] == [
        ("vutrain z2 torch", 4, False)
    ], result["rows"]
    assert "| vutrain z2 torch | 4 |" in rest  # in the final report too


@needs_open_clip
@pytest.mark.slow
def test_sigterm_mid_search_keeps_the_search_and_the_ones_it_never_reached(tmp_path):
    """The search the signal cut and those after it were dropped from `largest`: the report showed
    no trace of them, and on a GPU the largest-batch target was judged on the finished searches
    alone (a FAIL where the checkpointed search, last, would have passed)."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4"]
    argv += ["--zero-stages", "2", "--loss-backends", "torch", "--grad-ckpt", "both", "--steps", "1"]
    argv += ["--warmup", "1", "--pool", "16", "--max-batch", "4096"]
    argv += ["--search", "vutrain z2 torch,vutrain z2 torch ckpt"]
    # The first probe of the first search done: the signal cuts the next.
    rest = _sigterm_after(_start_compare(argv, out), "vutrain z2 torch: batch 8 fits")
    largest = json.loads(out.read_text())["largest"]
    assert [e["variant"] for e in largest] == ["vutrain z2 torch", "vutrain z2 torch ckpt"], largest
    cut, never = largest
    assert cut["stopped"] and cut["stopped_by"] == "SIGTERM" and not cut["capped"]
    assert cut["probes"][0] == [8, True] and cut["largest_batch"] >= 8
    assert cut["largest_batch"] == max(b for b, ok in cut["probes"] if ok)
    assert never["skipped"] == "stopped by SIGTERM" and "largest_batch" not in never
    assert "(search stopped at SIGTERM)" in rest and "skipped: stopped by SIGTERM" in rest


def test_bench_dispatches_its_subcommands(capsys):
    """`data ...` goes to vutrain.bench_data, `--compare` to bench_compare, the rest to the sweep."""
    from vutrain import bench

    assert bench.dispatch(["--batch-sizes", "8"]) is None
    cases = ((["data", "--help"], "bench data"), (["--compare", "open_clip", "--help"], "--compare"))
    for argv, prog in cases:
        with pytest.raises(SystemExit) as stop:
            bench.dispatch(argv)
        assert stop.value.code == 0 and prog in capsys.readouterr().out
