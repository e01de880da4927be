#!/usr/bin/env bash
# One-off mass fix that brings the tree to `make lint`: run it once, on main, after the parallel
# branches are merged (running it earlier would conflict with every open branch), review the diff,
# fix what it prints at the end by hand, and commit.
#
#   tools/lint_fix.sh            # uses .venv/bin/ruff, else ruff on PATH
#   RUFF=/path/to/ruff tools/lint_fix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=${RUFF:-$( [ -x .venv/bin/ruff ] && echo .venv/bin/ruff || command -v ruff || true )}
if [ -z "$RUFF" ]; then
    echo "ruff not found: pip install -e '.[dev]' (or set RUFF=/path/to/ruff)" >&2
    exit 2
fi

# 1. Old-style typing (List[int], Optional[X], typing.Sequence) to list[int], X | None,
#    collections.abc. ruff calls these unsafe for a py39 target because an annotation evaluated at
#    run time would break on 3.9; here every module has `from __future__ import annotations` and
#    only vutrain/config.py evaluates annotations (typing.get_type_hints on plain str/int/float/bool/
#    list fields), so they are safe for this tree.
"$RUFF" check --fix --unsafe-fixes --exit-zero --quiet --select UP006,UP007,UP035,UP045 . >/dev/null
# 2. The safe fixes: import order, unused imports (also the typing imports that 1 left unused),
#    unused noqa comments, quoted annotations, ...
"$RUFF" check --fix --exit-zero --quiet . >/dev/null
# 3. Formatting (line length, quotes, trailing commas) last, so it also formats the fixed code.
"$RUFF" format --quiet .

# What is left needs a person: show it, and fail so nobody commits a half-clean tree by mistake.
if "$RUFF" check . && "$RUFF" format --check --quiet .; then
    echo "lint_fix: clean; review 'git diff' and commit"
else
    echo "lint_fix: the findings above need a human (see 'ruff rule CODE' for each)" >&2
    exit 1
fi
