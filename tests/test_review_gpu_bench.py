"""`launch/gpu_bench.sh` before its steps: the wheels, the set-up and the time budget.

The GPU session runs the script once, blind, in one call: a set-up that fails takes every step with
it, and a step that ends past the device tool's limit loses its summary line. These run the real
script with a stand-in set-up script (the wheels are empty files: only their names matter to pip's
first check) and, where a step must start, /bin/true as its Python, so each test takes a second.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "gpu_bench.sh")


def script_env(tmp_path, setup_text: str, **env) -> dict:
    setup = tmp_path / "setup.sh"
    setup.write_text(setup_text)
    full_env = dict(
        os.environ,
        GPU_SETUP=str(setup),
        OUT=str(tmp_path / "out"),
        TMPDIR=str(tmp_path),
        PYTHON=sys.executable,
        PACK="0",
        WHEELS=str(tmp_path / "no_wheels"),
    )
    full_env.update(env)
    return full_env


def run_script(tmp_path, setup_text: str, *steps: str, **env) -> subprocess.CompletedProcess:
    full_env = script_env(tmp_path, setup_text, **env)
    return subprocess.run(["bash", SCRIPT, *steps], capture_output=True, text=True, env=full_env, timeout=120)


def start_script(tmp_path, setup_text: str, *steps: str, **env) -> subprocess.Popen:
    """run_script without the wait: calls that only sleep until their limit run side by side."""
    full_env = script_env(tmp_path, setup_text, **env)
    return subprocess.Popen(
        ["bash", SCRIPT, *steps], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )


def summary(tmp_path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "out" / "summary.txt").read_text().splitlines()]


def test_wheels_the_host_cannot_install_are_left_out_with_a_reason(tmp_path):
    """pip refuses the whole set for one wheel of another Python or two versions of one package:
    the set-up failed and the call measured nothing."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = [
        "good-1.0-py3-none-any.whl",
        "good-0.9-py3-none-any.whl",  # a stale one from an earlier prepare
        "native-1.0-cp27-cp27mu-manylinux1_x86_64.whl",  # another Python's binary wheel
        "deepspeed-0.19.8.tar.gz",  # the source archive setup.sh builds
    ]
    for name in names:
        (wheels / name).write_bytes(b"")
    # setup.sh's own test of the set: pip's, which fails on either problem
    setup = 'for f in "$WHEELS"/*; do echo "install $(basename "$f")"; done\n'
    proc = run_script(tmp_path, setup, "data", TOTAL_S="0", WHEELS=str(wheels))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "setup.log").read_text()
    installed = sorted(re.findall(r"^install (\S+)$", log, re.M))
    assert installed == ["deepspeed-0.19.8.tar.gz", "good-1.0-py3-none-any.whl"], log
    assert "left out native-1.0-cp27-cp27mu-manylinux1_x86_64.whl: built for cp27" in log, log
    assert "left out good-0.9-py3-none-any.whl: good-1.0-py3-none-any.whl is a newer version" in log, log
    assert sorted(os.listdir(wheels)) == sorted(names)  # the carried folder itself is left as it was


def test_setup_runs_once_and_what_it_exports_reaches_the_steps(tmp_path):
    """It ran twice, the second time untimed (setup.sh's import check of torch and deepspeed again)."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "seen"
    # setup.sh puts /tmp/site first on PYTHONPATH: every Python the script starts imports from it
    (site / "sitecustomize.py").write_text(
        f"import os\nopen({str(marker)!r}, 'a').write(os.environ.get('SETUP_MARK', 'unset') + '\\n')\n"
    )
    setup = f'echo once >> "{tmp_path}/runs"\nexport PYTHONPATH="{site}" SETUP_MARK="a b\'c"\n'
    proc = run_script(tmp_path, setup, "data", TOTAL_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "runs").read_text() == "once\n"
    seen = marker.read_text().splitlines()
    assert seen and set(seen) == {"a b'c"}, seen
    assert "host python:" in (tmp_path / "out" / "host.txt").read_text()


def test_a_failed_setup_still_runs_the_steps(tmp_path):
    """A set-up that failed ended the call: no step ran, not even those that need only torch."""
    proc = run_script(
        tmp_path, "echo 'pip: no matching distribution' >&2\nreturn 1\n", "compare", PYTHON="/bin/true"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failure is still the call's exit code
    assert [s[:2] for s in summary(tmp_path)] == [["setup", "1"], ["compare", "0"]], proc.stdout
    assert "setup failed (exit 1)" in proc.stderr


def test_a_step_limit_leaves_the_kill_grace_inside_the_total(tmp_path):
    """`timeout` kills a step 15 s after its TERM: a limit of all that was left of TOTAL_S let the
    script run past it, into the device tool's own limit."""
    proc = run_script(tmp_path, "", "compare", PYTHON="/bin/true", TOTAL_S="100", COMPARE_S="600")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    limit = int(re.search(r"== compare \(limit (\d+)s\)", proc.stdout).group(1))
    assert 20 <= limit <= 100 - 15, proc.stdout


def _node_ids(text: str) -> set[str]:
    """The test ids `pytest --collect-only -q` prints, one a line."""
    return {line.strip() for line in text.splitlines() if line.startswith("tests/") and "::" in line}


@pytest.mark.slow
def test_the_tests_step_collects_only_the_gpu_test_files_and_every_gpu_test(tmp_path):
    """`pytest -m gpu tests/` imported and collected the whole suite (about 2,300 tests, 43 s under
    load) to select about 55: the step now names the files that hold GPU tests, found at run time.
    Its two pytest commands, run here with --collect-only, select the same ids as the full collection."""
    calls = tmp_path / "pytest_calls"
    python = tmp_path / "python"  # the step's Python: pytest only lists what it would run
    python.write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "-m pytest" ]]; then echo "$*" >> {calls}\n'
        f'    exec {sys.executable} "$@" --collect-only\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    proc = run_script(tmp_path, "", "tests", PYTHON=str(python))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    step = _node_ids((out / "tests.log").read_text()) | _node_ids((out / "tests_multi_gpu.log").read_text())
    full = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--collect-only"]
        + ["tests/"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(SCRIPT)),
        timeout=600,
    )
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr
    every = _node_ids(full.stdout)
    assert len(every) > 40 and step == every, sorted(step ^ every)
    args = calls.read_text().split()
    paths = [arg for arg in args if arg.startswith("tests")]
    assert "tests/" not in paths and all(p.endswith(".py") for p in paths), paths


def _hanging_python(tmp_path):
    """A Python whose steps hang until signalled (the script's own `-c` checks run for real)."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\n[[ "$1" == -c ]] && exec {sys.executable} "$@"\nexec sleep 300\n')
    python.chmod(0o755)
    return str(python)


@pytest.mark.slow
def test_the_summary_says_which_steps_were_cut_or_skipped_and_how_to_rerun_them(tmp_path):
    """A cut step's line read `compare 124 21`, like any failure, with nothing saying the time ran
    out, and the steps the default order leaves out of a call had to be picked out by hand."""
    python = _hanging_python(tmp_path)
    # Both calls only wait (20 s or more) for their cut, each in a folder of its own: side by side.
    by_total, by_own = tmp_path / "total", tmp_path / "own"
    by_total.mkdir()
    by_own.mkdir()
    running = [
        start_script(by_total, "", "compare", "data", PYTHON=python, TOTAL_S="37", COMPARE_S="600"),
        # at the step's own limit, the line says so
        start_script(by_own, "", "compare", PYTHON=python, TOTAL_S="100", COMPARE_S="20"),
    ]
    try:
        (out, err), (own_out, _) = [proc.communicate(timeout=120) for proc in running]
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert running[0].returncode == 1, out + err  # a cut step is no success
    lines = summary(by_total)
    assert [s[:2] for s in lines[1:3]] == [["compare", "124"], ["data", "skipped"]], lines
    assert lines[1][3:5] == ["cut", "at"] and "what was left of TOTAL_S=37" in " ".join(lines[1]), lines
    assert lines[3] == ["rerun:", "bash", "launch/gpu_bench.sh", "compare", "data"], lines
    assert " ".join(summary(by_own)[1][3:]) == "cut at its limit of 20 s", own_out


@pytest.mark.slow
def test_the_steps_a_signal_left_unstarted_have_their_lines(tmp_path):
    """After the device tool's SIGTERM the steps not yet started had no line at all."""
    env = dict(
        os.environ,
        GPU_SETUP=str(tmp_path / "setup.sh"),
        OUT=str(tmp_path / "out"),
        TMPDIR=str(tmp_path),
        PYTHON=_hanging_python(tmp_path),
        PACK="0",
        WHEELS=str(tmp_path / "no_wheels"),
    )
    (tmp_path / "setup.sh").write_text("")
    proc = subprocess.Popen(
        ["bash", SCRIPT, "compare", "data"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "compare.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0].decode()
    lines = summary(tmp_path)
    assert [s[:2] for s in lines[1:]] == [["compare", "143"], ["data", "skipped"], ["rerun:", "bash"]], log
    assert lines[1][3] == "stopped" and "signalled" in lines[2][-1], lines
