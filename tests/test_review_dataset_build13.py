"""`dataset_tools build --output` given a URL (s3://, gs://, file://).

The build's plan, lock and shards are local files: `--output s3://bucket/out` made a local folder
`./s3:/bucket/out` holding a plan and a lock, then failed every shard ("Install s3fs") and exited 2.
It is now refused before anything is written, in one line saying what to do.
"""

import os

import pytest

from dataset_tools.cli import main


@pytest.mark.parametrize("url", ["s3://bucket/out", "gs://bucket/shards", "file:///data/out"])
def test_a_url_output_is_refused_before_anything_is_written(tmp_path, monkeypatch, url):
    inp = tmp_path / "videos.csv"
    inp.write_text("video_id,title\nabcdefghijk,a title\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["build", "--input", str(inp), "--output", url])
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith(f"--output {url}: build writes to a local")
    assert "copy the shards up afterwards" in message
    assert sorted(os.listdir(tmp_path)) == ["videos.csv"]  # no ./s3:/bucket/out with a plan and a lock
