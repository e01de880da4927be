"""``python -m vutrain.bench data``: the stream alone against plain decoding, JSON on the last line."""

import json

from vutrain.bench import main as bench_main
from vutrain.bench_data import write_thumbnail_shards


def test_bench_data_prints_table_and_json_last(tmp_path, capsys):
    spec = write_thumbnail_shards(str(tmp_path / "shards"), 48, 96, 72, shard_size=16)
    code = bench_main(
        [
            "data",
            "--shards",
            spec,
            "--workers",
            "2",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--batches",
            "4",
            "--decode-images",
            "16",
            "--decode-seconds",
            "0.2",
            "--compare",
            "--shuffle-buffer",
            "8",
            "--rounds",
            "2",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[-3].startswith("| ")  # the table, the verdict line, the summary
    summary = json.loads(lines[-1])
    assert lines[-2].startswith("per worker / decode: ")
    fastest = max(summary["decode_per_s_each"])  # each floor from its own fresh process
    assert summary["ratio_vs_fastest_decode"] == summary["samples_per_s_per_worker"] / fastest
    assert summary["samples_per_s_per_worker"] > 0 and summary["decode_per_s"] > 0
    assert abs(summary["ratio"] - summary["samples_per_s_per_worker"] / summary["decode_per_s"]) < 1e-9
    assert summary["source_sizes"] == {"96x72": 16} and summary["workers"] == 2 and summary["scaling"] > 0
    assert len(summary["ratio_each_round"]) == 2 and len(summary["decode_per_s_each"]) == 3
    assert summary["ratio"] in summary["ratio_each_round"]  # the median round, itself
    runs = {(r["path"], r["workers"]): r for r in summary["runs"]}
    assert runs[("fast", 2)]["pixel_dtype"] == "uint8" and runs[("processor", 2)]["pixel_dtype"] == "float32"
    assert runs[("fast", 1)]["batch_mib"] * 4 == runs[("processor", 2)]["batch_mib"]  # uint8: a quarter
