"""Shared by the install-check tests (test_install.py, test_review_packaging1.py): a stand-in for
python3, the venv's python and its console scripts, so that `tools/check_core_install.sh` runs its
own steps without installing torch (minutes, and the network)."""

from __future__ import annotations

from pathlib import Path

# `-m venv DIR` makes DIR/bin with the python and the scripts (copies of this file, which tells them
# apart by name); `-m vutrain.demo` leaves the HF export the check looks for. vutrain-dataset fails
# as on a core install, with exit status DATASET_EXIT (default 2: the check expects it).
_SCRIPT = """#!/bin/sh
case "$(basename "$0")" in
    vutrain-dataset) echo "needs the 'data' extra: pip install 'vutrain[data]'" >&2
        exit "${DATASET_EXIT:-2}";;
    vutrain-*) exit 0;;
esac
case "$1 $2" in
    "-m venv") mkdir -p "$3/bin"
        for name in python vutrain-train vutrain-export vutrain-dataset; do cp "$0" "$3/bin/$name"; done;;
    "-m vutrain.demo") mkdir -p demo_out/hf_model && touch demo_out/hf_model/config.json;;
esac
exit 0
"""


def write_stand_in_python(path: Path) -> Path:
    """The stand-in python, executable, at ``path`` (its folder must exist)."""
    path.write_text(_SCRIPT)
    path.chmod(0o755)
    return path
