"""Write constraints.txt: the versions a fresh `make venv` resolves today, for `make lock`.

pip resolves the test install (`-e '.[test]'`, held to the installed torch) and the bench extra
(`open_clip_torch`, without its dependencies, as the Makefile installs it) as if nothing were
installed, and this writes every resolved package except torch (the Makefile's TORCH_SPEC owns it),
vutrain itself and setuptools (a build tool). Run `make test` after a refresh and commit both.

    python tools/lock_versions.py [--out constraints.txt]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_PINNED = {"torch", "vutrain", "setuptools"}
HEADER = """\
# The versions `make venv` installs: what the last green CI resolved (torch excepted: the
# Makefile's TORCH_SPEC and the torch constraint own it). A new release on the registry then cannot
# break `make test` on a fresh clone between two changes (transformers 5.25 did: README, "Pinned
# versions"). setup.py keeps its ranges for users. Refresh with `make lock`, run `make test`, commit.
"""


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(*requirement_args: str) -> dict:
    """pip's resolution of `pip install ARGS` on an empty environment, as {name: version}."""
    torch_version = __import__("torch").__version__
    with tempfile.TemporaryDirectory() as tmp:
        constraint = Path(tmp, "torch.txt")
        constraint.write_text(f"torch=={torch_version}\n")
        report = Path(tmp, "report.json")
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
        command += ["--report", str(report), "-c", str(constraint), *requirement_args]
        subprocess.run(command, check=True, cwd=REPO)
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "constraints.txt")
    args = parser.parse_args()
    pins = resolve("-e", ".[test]")
    pins.update(resolve("--no-deps", "open_clip_torch>=3.0"))
    lines = [f"{name}=={version}\n" for name, version in sorted(pins.items()) if name not in NOT_PINNED]
    args.out.write_text(HEADER + "".join(lines))
    print(f"{args.out}: {len(lines)} pinned versions")


if __name__ == "__main__":
    main()
