"""The dataset_tools command line under Ctrl-C and bad counts: a real build in a subprocess against
the loopback fake host, interrupted with SIGINT; argparse in-process.

Runtime: ~20 s on 2 busy cores (one build's start-up, spawn pool included).
"""

import os
import signal

import pytest
from build_interrupt import STOPPED_BY_CTRL_C, dataset_tools_lines, slow_build, wait_for_requests

from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


@pytest.mark.slow  # its build starts in tests/build_interrupt.py
def test_ctrl_c_stops_a_build_with_one_line_that_says_to_resume(tmp_path):
    # SIGINT (Ctrl-C, ``kill -INT``) was a 30-line KeyboardInterrupt traceback out of the download
    # pool's wait, exit -2, and never said the build resumes. Sent to the build process alone; the
    # terminal's Ctrl-C to the whole process group is test_review_dataset_build7.py's.
    with slow_build(tmp_path) as (host, proc, out):
        wait_for_requests(host, proc, 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert dataset_tools_lines(err) == [STOPPED_BY_CTRL_C]
    assert not any(name.endswith("_stats.json") for name in os.listdir(out))  # no shard taken as done


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{dir}", "--top", "-2"],
        ["inspect", "{dir}", "--top", "two"],
        ["vocab", "{dir}", "--output", "{dir}/vocab.json", "--min-count", "-1"],
    ],
    ids=["top-negative", "top-word", "min-count-negative"],
)
def test_a_negative_count_is_refused_in_one_usage_line(tmp_path, capsys, argv):
    # inspect --top -2 was accepted: every table was sliced [:-2], its last two rows dropped
    # without a word, under a "top -2 tags" heading.
    with pytest.raises(SystemExit) as stop:
        main([arg.replace("{dir}", str(tmp_path)) for arg in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"python -m dataset_tools {argv[0]}: error: argument {argv[2 if argv[0] == 'inspect' else 4]}"
    )
    assert "must be 0 or more" in err[-1] or "invalid int value" in err[-1]
    assert not (tmp_path / "vocab.json").exists()


@pytest.mark.parametrize(
    "variants, says",
    [
        ("mqdefault hqdefault", "'mqdefault hqdefault' is not a thumbnail name"),
        ("hqdefault,mq/default", "'mq/default' is not a thumbnail name"),
        ("hqdefault,mqdefault,hqdefault", "hqdefault listed twice"),
    ],
    ids=["spaces", "slash", "repeated"],
)
def test_a_variant_list_that_cannot_work_is_refused_before_any_request(tmp_path, variants, says):
    # "--variants 'mqdefault hqdefault'" (spaces, not commas) was one variant whose URL every
    # request refused: each row failed as "connection error: InvalidURL (after 4 attempts)", exit
    # 0, and the shards counted as complete, so the corrected rerun kept every failure.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    inp.write_text("video_id,title\n" + "".join(f"vid{i:08d},t\n" for i in range(3)))
    with FakeThumbnailHost(max_lifetime=60) as host:
        argv = ["build", "--input", str(inp), "--output", str(out), "--url-template", host.url_template]
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--variants", variants, "--threads", "2", "--requests-per-second", "0"])
        assert host.requests == []
    (line,) = str(stop.value.code).splitlines()
    assert line.startswith(f"--variants {variants!r}: ") and says in line
    assert not out.exists()
