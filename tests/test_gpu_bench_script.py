"""`launch/gpu_bench.sh`, the one script a GPU session gets to run, dry-run on CPU at tiny sizes.

GPU time comes in one short lease: a command line of the script that no longer matches its
benchmark (a renamed option, an unknown `--search` label) would waste it. This runs every step's
real command (the default options, with the CPU sizes appended: later options win) and checks
that each step exits 0 and writes what the GPU session reads back, within the device tool's
limit of 8 files back.
"""

import json
import os
import signal
import subprocess
import tarfile
import time

import pytest

import train_runner as tr

pytestmark = pytest.mark.slow


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(
        tr.env(),
        GPU_SETUP=os.devnull,  # the GPU host's wheel installer has nothing to do here
        OUT=str(out),
        PYTHON=tr.sys.executable,
        # The step limits are sized for the GPU host; a loaded 2-core CI machine took 80+ s for the
        # CPU profile step (its limit): the dry run checks the commands, not the GPU's timings.
        **{
            f"{step}_S": "300"
            for step in ("TESTS", "DEMO", "COMPARE", "COMPILE", "E2E", "KERNELS", "PROFILE", "DATA")
        },
        TOTAL_S="3000",
        COMPARE_EXTRA="--preset tiny --precision fp32 --batch-sizes 4 --steps 1 --warmup 1 --pool 8 "
        "--max-batch 8 --zero-stages 2",
        COMPILE_EXTRA="--preset tiny --precision fp32 --batch-sizes 4 --steps 1 --warmup 1 --pool 8 "
        "--compile-backend aot_eager --zero-stages 2",
        KERNELS_ARGS="--quick",
        DATA_EXTRA="--batch-size 16 --batches 2 --decode-images 16 --decode-seconds 0.2 --rounds 1",
        # One rank, as the demo step's GPU recipe: a second CPU rank cost about 12 s and 6 CPU-s here.
        DEMO_EXTRA="--device cpu --ranks 1 --steps 2 --num-samples 256 --val-samples 48 --shard-size 64 "
        "--min-top1 0",
        E2E_EXTRA="--preset tiny --precision fp32 --batch-sizes 8 --steps 1 --warmup 1 --workers 1",
        PROFILE_EXTRA="--preset tiny --precision fp32 --batch-size 8 --workers 0 --warmup 1 --steps 1",
    )
    proc = subprocess.run(
        ["bash", os.path.join(tr.REPO, "launch", "gpu_bench.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=tr.REPO,
    )
    assert proc.returncode == 0, tr.describe(proc)
    # What comes back from the device: at most 8 files (here 2), the rest in one archive.
    assert sorted(os.listdir(out)) == ["results.tgz", "summary.txt"]
    steps = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    assert [(s[0], s[1]) for s in steps] == [
        ("setup", "0"),
        ("tests", "0"),
        ("demo", "0"),  # beside the tests, its line after theirs
        ("compare", "0"),
        ("compile", "0"),
        ("e2e", "0"),
        ("kernels", "0"),
        ("profile", "0"),
        ("data", "0"),
    ], tr.describe(proc)
    results = tmp_path / "results"
    with tarfile.open(out / "results.tgz") as archive:
        archive.extractall(results, filter="data")
    assert "skipped" in (results / "tests.log").read_text()  # the GPU tests ran, and skipped on CPU
    assert "skipped" in (results / "tests_multi_gpu.log").read_text()  # in their own pytest
    assert (results / "pytest_gpu.xml").is_file() and (results / "pytest_multi_gpu.xml").is_file()
    compare = json.loads((results / "compare_open_clip.json").read_text())
    searched = [e["variant"] for e in compare["largest"]]
    assert searched == ["open_clip", "vutrain z2 torch", "vutrain z2 triton ckpt"]  # the script's --search
    assert (results / "compare_open_clip.png").is_file()
    compiled = json.loads((results / "compare_compiled.json").read_text())
    assert [(r["variant"], "error" in r) for r in compiled["rows"]] == [
        ("vutrain z2 triton compile", False),
        ("open_clip", False),  # the baseline, as it ships, in the same process
        ("open_clip compile", False),
    ]
    assert any(name.endswith(".json") for name in os.listdir(results / "kernels"))
    assert "zero-shot top-1 on the held-out set" in (results / "demo.log").read_text()
    e2e = json.loads((results / "e2e.json").read_text())
    assert [r["batch_size"] for r in e2e] == [8] and "error" not in e2e[0], e2e
    profile = json.loads((results / "profile.log").read_text().strip().splitlines()[-1])
    assert profile["preset"] == "tiny" and len(profile["host_ms"]) == 4, profile  # the four phases
    summary = json.loads((results / "data_w8.log").read_text().strip().splitlines()[-1])
    assert summary["workers"] == 8 and summary["samples_per_s_per_worker"] > 0 and "scaling" in summary


def test_gpu_bench_exits_non_zero_when_a_step_failed(tmp_path):
    """The device tool reports the script's exit code: it was 0 whatever the steps did."""
    env = dict(tr.env(), GPU_SETUP=os.devnull, OUT=str(tmp_path), PYTHON=tr.sys.executable, PACK="0")
    script = os.path.join(tr.REPO, "launch", "gpu_bench.sh")
    failed = subprocess.run(["bash", script, "no_such_step"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "no_such_step unknown 0" in (tmp_path / "summary.txt").read_text()
    env["TOTAL_S"] = "0"  # every step skipped for lack of time: nothing failed
    skipped = subprocess.run(["bash", script, "data"], capture_output=True, text=True, env=env)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "data skipped 0" in (tmp_path / "summary.txt").read_text()


def _step_processes(out) -> list[int]:
    """Processes the script under test started (their environment names its OUT), still running."""
    marker = f"OUT={out}".encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_gpu_bench_keeps_finished_steps_when_the_call_is_stopped(tmp_path, signum):
    """The device tool ends a call at its limit by signalling the script's process group: the steps
    ran in process groups of their own (their `timeout`) and ran on; on SIGTERM the script packed
    around the running step and lost its summary line, and on SIGKILL nothing was packed: every
    file stayed loose in $OUT, more than the 8 that come back."""
    out = tmp_path / "out"
    env = dict(
        tr.env(),
        GPU_SETUP=os.devnull,
        OUT=str(out),
        TMPDIR=str(tmp_path),  # what a killed step leaves behind goes with the test's folder
        PYTHON=tr.sys.executable,
        KERNELS_ARGS="--quick",
        # a data step that runs for minutes: the one the signal stops
        DATA_EXTRA="--batch-size 16 --batches 100000 --decode-images 16 --decode-seconds 0.2 --rounds 1",
    )
    script = os.path.join(tr.REPO, "launch", "gpu_bench.sh")
    proc = subprocess.Popen(
        ["bash", script, "kernels", "data"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tr.REPO,
        start_new_session=True,  # its own process group, as under the device tool
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "data.log").exists():  # kernels done, data running
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signum)
        log = proc.communicate(timeout=60)[0].decode()
        if signum == signal.SIGTERM:  # the running step was stopped, and the script ended after it
            assert _step_processes(out) == [], log
    finally:
        for _ in range(5):  # what SIGKILL left running (the device tool ends it), children too
            for pid in _step_processes(out):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    names = os.listdir(out)
    assert "summary.txt" in names and "results.tgz" in names and len(names) <= 8, (names, log)
    steps = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    with tarfile.open(out / "results.tgz") as archive:
        packed = archive.getnames()
    assert "./kernels/bench_kernels.json" in packed and "./kernels.log" in packed, packed
    assert [s[:2] for s in steps[:2]] == [["setup", "0"], ["kernels", "0"]], steps
    if signum == signal.SIGTERM:
        assert sorted(names) == ["results.tgz", "summary.txt"], names  # packed at the end, as ever
        assert steps[2][0] == "data" and steps[2][1] != "0", steps  # its line, with its exit code
        assert "./data.log" in packed
