"""`launch/gpu_bench.sh` before its steps: the wheels, the set-up and the time budget.

The GPU session runs the script once, blind, in one call: a set-up that fails takes every step with
it, and a step that ends past the device tool's limit loses its summary line. These run the real
script with a stand-in set-up script (the wheels are empty files: only their names matter to pip's
first check) and, where a step must start, /bin/true as its Python, so each test takes a second.
"""

import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "gpu_bench.sh")


def run_script(tmp_path, setup_text: str, *steps: str, **env) -> subprocess.CompletedProcess:
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
    return subprocess.run(["bash", SCRIPT, *steps], capture_output=True, text=True, env=full_env, timeout=120)


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
