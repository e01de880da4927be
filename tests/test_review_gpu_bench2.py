"""`launch/gpu_bench.sh`: a tests step cut at its limit, and the default plan against TOTAL_S.

The tests step's limit sent SIGTERM to its whole process group: pytest died of it before writing
its XML or its list of failures, and a call that ran out of time said nothing of what had failed.
The default plan's limits add up to about 930 s (the set-up's 120 included) against TOTAL_S=540: its
later steps started on whatever was left and were cut with nothing measured. The real script runs
here on CPU with a stand-in set-up script, as in test_review_gpu_bench.py.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "gpu_bench.sh")


def run_script(tmp_path, *steps: str, **env) -> subprocess.CompletedProcess:
    setup = tmp_path / "setup.sh"
    setup.write_text("")
    full_env = dict(
        os.environ, GPU_SETUP=str(setup), OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path),
        PYTHON=sys.executable, PACK="0", WHEELS=str(tmp_path / "no_wheels"),
    )  # fmt: skip
    full_env.update(env)
    return subprocess.run(["bash", SCRIPT, *steps], capture_output=True, text=True, env=full_env, timeout=120)


def summary(tmp_path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "out" / "summary.txt").read_text().splitlines()]


@pytest.mark.slow
def test_a_tests_step_cut_at_its_limit_keeps_pytests_xml_and_failures(tmp_path):
    """TESTS_S=20 against a test that hangs, after one that fails: the step is cut (its line and
    the rerun: line say so), and pytest_gpu.xml and the step's log still name the failed test.
    20 s is the least run_step starts a step with, and the wait is all sleeping: this pytest
    imports nothing of the project, so it reaches the hanging test well inside it."""
    tests = tmp_path / "test_hang.py"
    tests.write_text(
        "import time, pytest\n"
        "@pytest.mark.gpu\ndef test_fails(): assert 1 == 2\n"
        "@pytest.mark.gpu\ndef test_hangs(): time.sleep(600)\n"
    )
    proc = run_script(tmp_path, "tests", TESTS_S="20", TESTS_ARGS=str(tests), TOTAL_S="200")
    lines = summary(tmp_path)
    assert lines[1][:2] == ["tests", "124"] and lines[1][3:5] == ["cut", "at"], lines
    assert lines[2] == ["rerun:", "bash", "launch/gpu_bench.sh", "tests"], lines
    xml = tmp_path / "out" / "pytest_gpu.xml"
    assert xml.exists(), proc.stdout
    assert 'name="test_fails"' in xml.read_text() and "<failure" in xml.read_text()
    assert "FAILED" in (tmp_path / "out" / "tests.log").read_text()


@pytest.mark.slow
def test_the_default_plan_starts_no_step_its_limit_does_not_fit(tmp_path):
    """TOTAL_S=60 with every step's Python /bin/true: compare (170 s) does not fit, so neither it nor
    any step after it starts (before, each started on what was left); the rerun: line names them in
    the plan's order. Named on the command line, a step still starts on what is left."""
    proc = run_script(
        tmp_path, PYTHON="/bin/true", TOTAL_S="60", TESTS_S="20", DEMO_S="20",
    )  # fmt: skip
    lines = summary(tmp_path)
    assert [line[:2] for line in lines[1:3]] == [["tests", "0"], ["demo", "0"]], proc.stdout
    later = ["compare", "compile", "e2e", "kernels", "profile", "data"]
    assert [line[:2] for line in lines[3:9]] == [[step, "skipped"] for step in later], lines
    assert "does not fit" in " ".join(lines[3]), lines
    assert lines[9] == ["rerun:", "bash", "launch/gpu_bench.sh", *later], lines
    proc = run_script(tmp_path, "compare", PYTHON="/bin/true", TOTAL_S="60")
    assert summary(tmp_path)[1][:2] == ["compare", "0"], proc.stdout
