"""Review 13 of the benchmarks (data side): what `python -m vutrain.bench data` and
`python -m dataset_tools.bench` record about where their figures come from, and the
`dataset_tools.bench` options that ended a whole run with a message blaming img2dataset.

Real components: a real `vutrain.bench data` run on real shards in this process, with its real
loader worker and decode processes; the real provenance record of `dataset_tools.bench`.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest
from usage_lines import usage_error_line

from vutrain.bench import main as bench_main
from vutrain.bench_data import write_thumbnail_shards


@pytest.fixture
def one_cpu():
    """This process (and the children it starts) pinned to one CPU, as taskset or SLURM pin a run."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_data_bench_records_a_command_that_reruns_and_the_cores_it_could_use(tmp_path, capsys, one_cpu):
    """The documented `--shards 'DIR/{00000..00001}.tar'` was recorded bare: pasted back, the shell
    expanded the braces into two arguments (a usage error). And `cores` was the machine's count,
    not the one CPU this run was pinned to."""
    spec = write_thumbnail_shards(str(tmp_path / "shard dir"), 8, 64, 48, shard_size=4)
    assert "{00000..00001}" in spec and " " in spec
    argv = ["--shards", spec, "--batch-size", "4", "--image-size", "32", "--batches", "2"]
    argv += ["--decode-images", "4", "--decode-seconds", "0", "--rounds", "1", "--shuffle-buffer", "4"]
    argv += ["--context-length", "16"]
    assert bench_main(["data", *argv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shlex.split(summary["command"]) == ["python", "-m", "vutrain.bench", "data", *argv]
    assert summary["cores_usable"] == 1 and summary["cores"] == os.cpu_count()


def test_dataset_tools_bench_records_a_command_that_reruns_and_the_cpus_it_could_use(tmp_path, one_cpu):
    from dataset_tools.bench import where_measured

    argv = ["-n", "2", "--out", str(tmp_path / "my results" / "r.json")]
    record = where_measured(argv)
    assert shlex.split(record["command"]) == ["python", "-m", "dataset_tools.bench", *argv]
    assert record["cpus_usable"] == 1 and record["cpus"] == os.cpu_count()
    if os.cpu_count() > 1:
        assert record["device"].startswith(f"CPU (1 of {os.cpu_count()} cores usable, ")
    assert record["date"] and "commit" in record


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--latency", "-1"], "--latency -1.0"),
        (["--latency", "nan"], "--latency nan"),
        (["--image-size", "0"], "--image-size 0"),
    ],
)
def test_dataset_tools_bench_refuses_what_would_fail_every_download(capsys, flags, named):
    """Before: plain img2dataset's whole download ran first. With such a latency every request
    failed and the run ended with "plain img2dataset: only 0/2 succeeded", as if img2dataset were
    at fault; an image size of 0 was refused only then, by ours' config check."""
    import dataset_tools.bench as bench

    line = usage_error_line(capsys, lambda: bench.main(["-n", "2", *flags]))
    assert named in line and "must be" in line
