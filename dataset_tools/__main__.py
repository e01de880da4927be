"""``python -m dataset_tools <build|inspect|finalize|split|vocab|dedup> ...``"""
import sys

from dataset_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
