"""Write constraints.txt: the versions a fresh `make venv` resolves today, for `make lock`.

pip resolves the test install (`-e '.[test]'`, held to the installed torch) and the bench extra
(`open_clip_torch`, without its dependencies, as the Makefile installs it) as if nothing were
installed, and this writes every resolved package except torch (the Makefile's TORCH_SPEC owns it),
vutrain itself and setuptools (a build tool). Run `make test` after a refresh and commit both.

    python tools/lock_versions.py [--out constraints.txt]

`make venv` also runs `--for-installed-torch constraints.txt --out .venv/constraints.txt`: the pins
less those that the installed torch's own requirements reject (a CUDA torch you installed pins its
triton, sympy, ...: the lock's versions made pip refuse the whole install).
"""

import argparse
import importlib
import json
import re
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
    refuse_pins_beyond_python(installs)
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def refuse_pins_beyond_python(installs: list[dict]) -> None:
    """Stop, in one line, when the resolution holds a release the oldest allowed Python cannot install."""
    floor = python_floor()
    too_new = pins_beyond_python(installs, floor)
    if too_new:
        this = f"{sys.version_info.major}.{sys.version_info.minor}"
        sys.exit(
            f"lock_versions: {', '.join(too_new)}: not installable on Python {floor}, which setup.py allows"
            f" (this is {this}); refresh the lock from a .venv made with Python {floor}:"
            f" make clean; make lock PYTHON=python{floor}"
        )


def python_floor() -> str:
    """The oldest Python setup.py allows (its `python_requires=">=X.Y"`), e.g. "3.11"."""
    found = re.search(r"python_requires\s*=\s*[\"']>=\s*([0-9.]+)", (REPO / "setup.py").read_text())
    if found is None:
        sys.exit("lock_versions: setup.py has no python_requires='>=X.Y' to check the lock against")
    return found.group(1)


def pins_beyond_python(installs: list[dict], floor: str) -> list[str]:
    """`name==version (Requires-Python ...)` of each resolved package (of pip's --report `install`
    list) that Python `floor` cannot install. pip resolves for the Python that runs it: a lock made
    on 3.13 could pin a release that dropped 3.11, and a fresh `make venv` on 3.11 (which setup.py
    and the Makefile accept) would then fail in pip's resolver on the lock itself."""
    specifiers = _packaging("specifiers")
    beyond = []
    for install in installs:
        metadata = install["metadata"]
        required = metadata.get("requires_python")
        if canonical(metadata["name"]) in NOT_PINNED or not required:
            continue
        if not specifiers.SpecifierSet(required).contains(floor, prereleases=True):
            beyond.append(f"{metadata['name']}=={metadata['version']} (Requires-Python {required})")
    return beyond


def _packaging(module: str):
    """packaging.`module`, or pip's copy of it in a fresh venv (pip and torch only)."""
    try:
        return importlib.import_module(f"packaging.{module}")
    except ImportError:
        return importlib.import_module(f"pip._vendor.packaging.{module}")


def _requirements_module():
    return _packaging("requirements")


def _torch_needs() -> dict:
    """{canonical name: SpecifierSet} of the installed torch's requirements on this platform."""
    from importlib.metadata import PackageNotFoundError, requires

    requirements = _requirements_module()
    try:
        specs = requires("torch") or []
    except PackageNotFoundError:
        sys.exit("lock_versions: torch is not installed in this Python; install torch first (make venv does)")
    needs = {}
    for spec in specs:
        requirement = requirements.Requirement(spec)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            needs[canonical(requirement.name)] = requirement.specifier
    return needs


def _exact_versions(specifier) -> list[str]:
    return [s.version for s in specifier if s.operator in ("==", "===") and "*" not in s.version]


def _conflicts(pin, torch_needs: dict) -> bool:
    """Whether constraint `pin` (a Requirement) and the installed torch's requirement cannot both hold.

    Decided on the exact versions either side names: a lock line's `==V` against torch's range, or
    torch's own `==V` against a range of the constraints; two open ranges are left to pip."""
    needed = torch_needs.get(canonical(pin.name))
    if needed is None or (pin.marker is not None and not pin.marker.evaluate({"extra": ""})):
        return False
    pinned = _exact_versions(pin.specifier)
    if pinned:
        return not all(needed.contains(v, prereleases=True) for v in pinned)
    return not all(pin.specifier.contains(v, prereleases=True) for v in _exact_versions(needed))


def held_by_installed_torch(constraints: str) -> tuple[str, list[str]]:
    """`constraints` less each pin that a requirement of the installed torch rejects; and those pins.

    The installed torch is kept whatever its version (the Makefile), so what it requires wins. Lines
    are read as pip reads them: spaces around `==`, any operator, an environment marker (a pin for
    another platform stays) and a ` #` comment; a line that is not a requirement (an option like
    `--index-url`) is kept for pip to read."""
    requirements = _requirements_module()
    torch_needs = _torch_needs()
    kept, dropped = [], []
    for line in constraints.splitlines(keepends=True):
        text = re.split(r"(^|\s)#", line, maxsplit=1)[0].strip()
        try:
            pin = requirements.Requirement(text) if text and not text.startswith("-") else None
        except requirements.InvalidRequirement:
            pin = None
        if pin is not None and _conflicts(pin, torch_needs):
            dropped.append(line.strip())
        else:
            kept.append(line)
    return "".join(kept), dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "constraints.txt")
    parser.add_argument(
        "--for-installed-torch",
        type=Path,
        metavar="CONSTRAINTS",
        help="write CONSTRAINTS less the pins the installed torch rejects to --out (what `make venv` uses)",
    )
    args = parser.parse_args()
    if args.for_installed_torch:
        text, dropped = held_by_installed_torch(args.for_installed_torch.read_text())
        args.out.write_text(text)
        if dropped:
            print(f"{args.out}: left to the installed torch: {', '.join(dropped)}")
        return
    pins = resolve("-e", ".[test]")
    pins.update(resolve("--no-deps", "open_clip_torch>=3.0"))
    lines = [f"{name}=={version}\n" for name, version in sorted(pins.items()) if name not in NOT_PINNED]
    args.out.write_text(HEADER + "".join(lines))
    print(f"{args.out}: {len(lines)} pinned versions")


if __name__ == "__main__":
    main()
