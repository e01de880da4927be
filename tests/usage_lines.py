"""The one line argparse prints for a refused argument, for the tests of the command-line tools'
usage errors (the benchmarks: vutrain.bench, vutrain.bench_data, kernels.bench, dataset_tools.bench)."""

from __future__ import annotations

import pytest


def usage_error_line(capsys, call) -> str:
    """The last stderr line of `call()`, which must stop as argparse does for a refused argument:
    exit 2, no traceback. `capsys`: the test's pytest fixture."""
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]
