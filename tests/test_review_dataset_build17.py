"""dataset_tools build, seventeenth review: a build on a finalized output refreshes sizes.json,
__len__ and manifest.json when it changed the shards' samples (new shards, a --retry-failed merge),
so the trainer sizes its epochs from the shards as they are.

Runtime: ~20 s on 2 busy cores (two real builds against a loopback fake host, one process).
"""

import json

from small_builds import build_args, write_ids_csv

from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost
from vutrain.data.shards import count_samples, expand_shards

_FIRST = ["vid00000000", "vid00000001", "vid00000002", "vid00000003"]
_NEW = ["vid00000004", "vid00000005"]


def test_a_build_after_finalize_refreshes_its_files(tmp_path, capsys):
    # The output was finalized after a first build with one failed row; a resume with --retry-failed
    # then recovered that row and built a shard of new videos. sizes.json, __len__ and the manifest
    # stayed as finalize wrote them: the trainer counted 3 samples (the stale sizes.json lacks the
    # new shard, so the stale __len__) where the shards hold 6, and the brace left 00001 out.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, _FIRST)
    with FakeThumbnailHost({_FIRST[1]: "missing"}, max_lifetime=300) as host:
        assert main(build_args(host.url_template, inp, out)) == 0
        assert main(["finalize", str(out)]) == 0
        assert (out / "__len__").read_text() == "3\n"
        write_ids_csv(inp, _FIRST + _NEW)
        host.behaviours[_FIRST[1]] = "ok"  # the host recovered
        capsys.readouterr()
        assert main(build_args(host.url_template, inp, out, "--retry-failed")) == 0
    assert count_samples(expand_shards(f"{out}/{{00000..00001}}.tar")) == 6
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    assert (out / "__len__").read_text() == "6\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["brace"] == "{00000..00001}.tar"
    assert "refreshed sizes.json, __len__, manifest.json" in capsys.readouterr().out


def test_a_build_that_changed_nothing_leaves_finalize_files_alone(tmp_path, capsys):
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, _FIRST[:2])
    with FakeThumbnailHost({_FIRST[1]: "missing"}, max_lifetime=300) as host:
        assert main(build_args(host.url_template, inp, out)) == 0
        assert main(["finalize", str(out)]) == 0
        written = {name: (out / name).stat().st_mtime_ns for name in ("sizes.json", "__len__")}
        capsys.readouterr()
        # Retried and failed again: the attempts change, the samples do not.
        assert main(build_args(host.url_template, inp, out, "--retry-failed")) == 0
    assert "refreshed" not in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written
