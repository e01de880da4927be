"""Where a benchmark figure comes from: the command, the commit and the versions that made it.

Every benchmark JSON carries this block, so a figure copied into BENCHMARKS.md can be traced to
what produced it (the device and date are the benchmark's own fields).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys


def commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout these modules run from (with ``+dirty`` when the
    tracked files differ from it); None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(command: str, packages: tuple[str, ...]) -> dict:
    """``{"command", "argv", "commit", "versions"}`` for a benchmark's JSON."""
    return {"command": command, "argv": sys.argv[1:], "commit": commit(), "versions": versions(packages)}
