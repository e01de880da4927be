"""``python -m dataset_tools <build|inspect|finalize|split|vocab|dedup> ...`` (also ``vutrain-dataset``)."""

import sys

from dataset_tools.cli import main

# The `data` extra of setup.py: a core `pip install vutrain` lacks these.
DATA_EXTRA = ("img2dataset", "pandas", "pyarrow", "imagehash")


def run(argv=None) -> int:
    """main(), with a one-line hint instead of a traceback when a subcommand needs the `data` extra."""
    try:
        return main(argv)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in DATA_EXTRA:
            raise
        args = sys.argv[1:] if argv is None else argv
        command = next((a for a in args if not a.startswith("-")), "this command")
        print(
            f"dataset_tools {command} needs the 'data' extra ({missing} is not installed): "
            "pip install 'vutrain[data]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(run())
