"""The small real builds the dataset-build tests run against `dataset_tools/fake_host.py`: their
input CSV and their `python -m dataset_tools build` arguments (the mqdefault variant, one download
process of two threads, no rate limit unless given)."""

from __future__ import annotations


def write_ids_csv(path, ids) -> None:
    """A `video_id,title` CSV with one row per id, titled "title <id>"."""
    path.write_text("video_id,title\n" + "".join(f"{vid},title {vid}\n" for vid in ids))


def build_args(url_template, inp, out, *extra, shard_size=4, processes=1, threads=2, rate=0) -> list[str]:
    """`build` arguments for `dataset_tools.cli.main`; `extra` flags come last."""
    return [
        "build", "--input", str(inp), "--output", str(out), "--url-template", url_template,
        "--variants", "mqdefault", "--shard-size", str(shard_size), "--processes", str(processes),
        "--threads", str(threads), "--requests-per-second", str(rate), *extra,
    ]  # fmt: skip
