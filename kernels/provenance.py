"""Where a benchmark figure comes from: the command, the commit and the versions that made it.

Every benchmark JSON carries this block, so a figure copied into BENCHMARKS.md can be traced to
what produced it (the device and date are the benchmark's own fields).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout these modules run from (with ``+dirty`` when the
    tracked files differ from it); None outside a git checkout, and None for a copy the
    enclosing checkout does not track: ``pip install .`` into a ``.venv`` inside the checkout
    puts this file in an ignored folder, and git, walking up from there, named the checkout's
    commit for code that may be another version."""
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    try:
        head = _git(root, "rev-parse", "HEAD")
        _git(root, "ls-files", "--error-unmatch", "--", here)
        # Checked: a failing `git status` read as "no changes" would claim a clean tree.
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# Triton ships under other distribution names where torch brings its own: ROCm wheels
# (pytorch-triton-rocm), nightlies (pytorch-triton), XPU and Windows builds. Asked for "triton" only,
# those installs read as "not installed": the JSON said triton null and tuned tables recorded no
# Triton version, so a table tuned under one Triton applied under any.
DISTRIBUTION_ALIASES = {
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu", "triton-windows")
}


def distribution_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (or of one of its ``DISTRIBUTION_ALIASES``);
    None where none is installed."""
    for candidate in DISTRIBUTION_ALIASES.get(name, (name,)):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    return {"python": sys.version.split()[0]} | {name: distribution_version(name) for name in packages}


def provenance(command: str, packages: tuple[str, ...]) -> dict:
    """``{"command", "argv", "commit", "versions"}`` for a benchmark's JSON."""
    return {"command": command, "argv": sys.argv[1:], "commit": commit(), "versions": versions(packages)}
