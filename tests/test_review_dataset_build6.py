"""dataset_tools build, sixth review: the user's own files in --output, image options on resume.

Runtime: ~15 s on 2 busy cores (real builds against the loopback fake host, one process each).
"""

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
from PIL import Image
from small_builds import build_args, write_ids_csv

from dataset_tools import plan as plan_mod
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def _args(host, inp, out, *extra):
    return build_args(host.url_template, inp, out, *extra)


def _image_sizes(out):
    sizes = set()
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".jpg"):
                        sizes.add(Image.open(io.BytesIO(tar.extractfile(member).read())).size)
    return sizes


def test_build_keeps_the_users_tmp_files_and_removes_its_own(tmp_path):
    # Every *.tmp of --output was removed at the build's start: the user's notes too.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, [f"vid{i:08d}" for i in range(3)])
    out.mkdir()
    (out / "my-notes.tmp").write_text("mine")
    (out / "00007.tmp").write_text("mine too")
    stale = ["00000.tar.123-0123456789ab.tmp", "00000.parquet.9-abcdefabcdef.tmp", "00001.tar.tmp"]
    stale.append("00000_stats.json.42-0123456789ab.tmp")
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_args(host, inp, out, "--image-size", "32")) == 0
        for name in stale:  # what a killed build leaves behind
            (out / name).write_bytes(b"half")
        assert main(_args(host, inp, out, "--image-size", "32")) == 0
    assert (out / "my-notes.tmp").read_text() == "mine"
    assert (out / "00007.tmp").read_text() == "mine too"
    assert not [name for name in stale if (out / name).exists()]


def test_resume_with_other_image_options_keeps_the_planned_ones(tmp_path, capsys):
    # A --retry-failed with another --image-size wrote 114-px images beside the 57-px ones.
    ids = [f"vid{i:08d}" for i in range(3)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_args(host, inp, out, "--image-size", "32")) == 0
        sizes = _image_sizes(out)
        assert len(sizes) == 1 and min(next(iter(sizes))) == 32  # keep_ratio: the short side
        write_ids_csv(inp, ids + [f"new{i:08d}" for i in range(3)])
        capsys.readouterr()
        changed = ["--image-size", "64", "--encode-quality", "50", "--crop-letterbox", "--retry-failed"]
        assert main(_args(host, inp, out, *changed)) == 0
    printed = capsys.readouterr().out
    assert "image options kept from this output's plan: --image-size 32 (given 64)" in printed
    assert "--encode-quality 95 (given 50)" in printed and "--crop-letterbox off (given on)" in printed
    assert _image_sizes(out) == sizes  # the new shard's images are built like the old ones
    with open(out / "_build" / "summary.json") as f:
        assert json.load(f)["image_options"]["image_size"] == 32
    assert plan_mod.planned_image_options(str(out))["image_size"] == 32


def test_plan_without_recorded_image_options_still_resumes(tmp_path, capsys):
    ids = [f"vid{i:08d}" for i in range(3)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_args(host, inp, out, "--image-size", "32")) == 0
        path = plan_mod.plan_path(str(out))  # as a build from before this change saved it
        pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
        assert plan_mod.planned_image_options(str(out)) is None
        write_ids_csv(inp, ids + ["new00000000"])
        assert main(_args(host, inp, out, "--image-size", "32")) == 0
    assert "image options kept" not in capsys.readouterr().out
    assert plan_mod.planned_image_options(str(out))["image_size"] == 32  # recorded from now on
