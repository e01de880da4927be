"""Metadata readers, fourth review: the encoding checks of a CSV that is not UTF-8 read it in
blocks; a trending date keeps the day it is written in, whatever its zone.

Runtime: ~10 s on 2 busy cores (a 24 MB CSV checked twice, once under tracemalloc).
"""

import datetime
import tracemalloc

import pandas as pd

from dataset_tools import metadata

A, B = "dQw4w9WgXcQ", "9bZkp7q19f0"


def _peak_bytes(fn, *args):
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_encoding_checks_of_a_large_non_utf8_csv_hold_a_block_not_the_file(tmp_path):
    # Both checks read the whole file as bytes and decoded it whole: a 2 GB Windows-1252 dump
    # took its size in bytes and again (or four times) in text before pandas read a row.
    row = "dQw4w9WgXcQ,Caf\xe9 \u2019live\u2019 \u20ac5 \u2026\n".encode("cp1252")
    path = tmp_path / "big.csv"
    with open(path, "wb") as fh:
        fh.write(b"video_id,title\n")
        block = row * (1 << 14)
        for _ in range(24 * (1 << 20) // len(block)):
            fh.write(block)
    size = path.stat().st_size
    # A few blocks at a time (each as bytes and as text), whatever the size of the file.
    bound = min(12 * metadata._DECODE_BLOCK, size / 2)
    decodes, peak = _peak_bytes(metadata._decodes, str(path), "cp1252")
    assert decodes and peak < bound, (peak, size)
    damage, peak = _peak_bytes(metadata._utf8_damage, str(path))
    assert damage is None and peak < bound, (peak, size)  # latin text, not damaged UTF-8


def test_a_few_bad_bytes_in_a_utf8_csv_are_still_named_by_count_and_line(tmp_path):
    path = tmp_path / "cut.csv"
    lines = ["video_id,title\n", *(f"{A},Привет мир {i}\n" for i in range(5)), f"{B},cut "]
    path.write_bytes("".join(lines).encode() + b"\xd0\n")
    assert metadata._utf8_damage(str(path)).startswith("1 invalid UTF-8 sequence(s) (the first on line 7)")
    rows = {r["video_id"]: r for r in metadata.read_metadata([str(path)]).rows}
    assert rows[A]["title"] == "Привет мир 4" and rows[B]["title"] == "cut \ufffd"


def test_a_trending_timestamp_keeps_the_day_it_is_written_in(tmp_path):
    # Not a bug, pinned: a trending date names a chart's calendar day, so a day stored as its
    # local midnight stays that day (in UTC, +05:30 midnight is the day before).
    csv = tmp_path / "trending.csv"
    csv.write_text(
        f"video_id,trending_date,title\n{A},2017-11-14T00:00:00.000Z,z\n{B},2017-11-14T00:00:00+05:30,india\n"
    )
    rows = {r["video_id"]: r["trending_date"] for r in metadata.read_metadata([str(csv)]).rows}
    assert rows == {A: "2017-11-14", B: "2017-11-14"}
    ist = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    table = pd.DataFrame(
        {"video_id": [A], "trending_date": [pd.Timestamp(2017, 11, 14, tz=ist)], "title": ["p"]}
    )
    table.to_parquet(tmp_path / "trending.parquet")
    (row,) = metadata.read_metadata([str(tmp_path / "trending.parquet")]).rows
    assert row["trending_date"] == "2017-11-14"
