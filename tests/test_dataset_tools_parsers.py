"""Metadata parsing: every input format with its quirks, id normalisation, duplicates."""

import json
import os

import pandas as pd
import pytest

from dataset_tools import metadata, youtube

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "dataset_tools")


@pytest.mark.parametrize(
    "value,expected",
    [
        ("dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("  dQw4w9WgXcQ ", "dQw4w9WgXcQ"),
        ("https://www.youtube.com/watch?v=dQw4w9WgXcQ&list=PL1&t=42s", "dQw4w9WgXcQ"),
        ("https://m.youtube.com/watch?feature=share&v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://youtu.be/dQw4w9WgXcQ?si=x", "dQw4w9WgXcQ"),
        ("youtube.com/shorts/dQw4w9WgXcQ?feature=share", "dQw4w9WgXcQ"),
        ("https://www.youtube-nocookie.com/embed/-_-_-_-_-_-?start=3", "-_-_-_-_-_-"),
        ("https://music.youtube.com/watch?v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://www.youtube.com/live/dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://example.com/watch?v=dQw4w9WgXcQ", None),
        ("https://www.youtube.com/watch?v=short", None),
        ("dQw4w9WgXc", None),
        ("", None),
        (None, None),
        ("two words!!", None),
    ],
)
def test_normalize_video_id(value, expected):
    assert youtube.normalize_video_id(value) == expected


def test_tags_titles_categories():
    assert youtube.parse_tags('last week|"john oliver"|"hbo"') == ["last week", "john oliver", "hbo"]
    assert (
        youtube.parse_tags("[none]") == [] and youtube.parse_tags("") == [] and youtube.parse_tags(None) == []
    )
    assert youtube.parse_tags(["a", "a", " b "]) == ["a", "b"]
    assert youtube.parse_tags('["x", "y"]') == ["x", "y"]
    assert youtube.clean_title("Tom &amp;amp; Jerry\n  &#39;s\u00a0show ") == "Tom & Jerry 's show"
    assert youtube.category_name(24) == "Entertainment"
    assert youtube.category_name(24, {24: "Other"}) == "Other"
    assert youtube.category_id_from_name("Comedy") == 23  # the assignable one, not 34
    assert youtube.parse_category_id("24.0") == 24 and youtube.parse_category_id("x") is None


def _by_id(result):
    return {r["video_id"]: r for r in result.rows}


def test_kaggle_2017_schema_with_quirks():
    res = metadata.read_metadata([os.path.join(FIX, "USvideos.csv")])
    assert res.formats[os.path.join(FIX, "USvideos.csv")] == "kaggle"
    assert res.input_rows == 6 and res.duplicates == 1
    assert [r["reason"] for r in res.rejected] == ["invalid video id"]  # reported, not silently lost
    rows = _by_id(res)
    assert set(rows) == {"2kyS6SvSYSE", "1ZAPwfrtAFY", "5qpjK5DgCt4", "d380meD0W0M"}
    casey = rows["2kyS6SvSYSE"]
    # Newest trending day wins (17.15.11 = 2017-11-15, YY.DD.MM).
    assert casey["title"] == "WE WANT TO TALK ABOUT OUR MARRIAGE (updated)"
    assert casey["trending_date"] == "2017-11-15" and casey["tags"] == ["SHANtell martin", "shantell"]
    assert rows["5qpjK5DgCt4"]["title"] == "Racist Superman | Rudy Mancuso & King Bach"
    assert rows["1ZAPwfrtAFY"]["tags"][:2] == [
        "last week tonight trump presidency",
        "last week tonight donald trump",
    ]
    assert rows["d380meD0W0M"]["tags"] == []
    # The sibling US_category_id.json wins over the built-in table.
    assert rows["1ZAPwfrtAFY"]["category_id"] == 24
    assert rows["1ZAPwfrtAFY"]["category_name"] == "Entertainment (US)"
    assert casey["channel_title"] == "CaseyNeistat"


def test_kaggle_new_schema_dedup_fills_gaps():
    res = metadata.read_metadata([os.path.join(FIX, "trending_new.csv")], categories_json=None)
    rows = _by_id(res)
    assert res.formats[os.path.join(FIX, "trending_new.csv")] == "kaggle" and res.duplicates == 1
    apex = rows["M9Pmf9AB4Mo"]
    assert apex["trending_date"] == "2020-08-13"  # newest
    assert apex["tags"][0] == "Apex Legends"  # newest row had no tags: filled from the older row
    assert apex["category_name"] == "Gaming" and apex["channel_id"] == "UC0ZV6M2THA81QT9hrVWJG3A"
    assert apex["title"] == "Apex Legends | Stories from the Outlands – “The Endorsement”"
    assert rows["3C66w5Z0ixs"]["publish_time"] == "2020-08-11T19:20:14Z"


def test_tsv_with_url_forms():
    res = metadata.read_metadata([os.path.join(FIX, "links.tsv")], "csv")
    rows = _by_id(res)
    assert set(rows) == {"dQw4w9WgXcQ", "9bZkp7q19f0", "abcdefghijk", "-_-_-_-_-_-", "ABCDEFGHIJK"}
    assert rows["dQw4w9WgXcQ"]["title"] == "Never Gonna Give You Up"
    assert rows["dQw4w9WgXcQ"]["tags"] == ["music", "80s"] and rows["9bZkp7q19f0"]["tags"] == []
    assert len(res.rejected) == 1 and "example.com" in json.dumps(res.rejected[0])


def test_jsonl_and_parquet(tmp_path):
    res = metadata.read_metadata([os.path.join(FIX, "videos.jsonl")])
    rows = _by_id(res)
    assert rows["AAAAAAAAAAA"]["title"] == "Cats & dogs compilation"
    assert rows["AAAAAAAAAAA"]["tags"] == ["cat", "dog"]
    assert rows["AAAAAAAAAAA"]["category_id"] == 15  # from the category *name*
    assert rows["BBBBBBBBBBB"]["category_name"] == "Education" and rows["BBBBBBBBBBB"]["tags"] == ["a", "b"]
    assert len(res.rejected) == 1
    path = tmp_path / "v.parquet"
    pd.DataFrame(
        {
            "url": ["https://youtu.be/AAAAAAAAAAA", "EEEEEEEEEEE"],
            "title": ["x", "y"],
            "tags": [["t1", "t2"], []],
        }
    ).to_parquet(path)
    rows = _by_id(metadata.read_metadata([str(path)]))
    assert rows["AAAAAAAAAAA"]["tags"] == ["t1", "t2"] and rows["EEEEEEEEEEE"]["tags"] == []


def test_ytdlp_dump_json():
    path = os.path.join(FIX, "ytdlp.jsonl")
    res = metadata.read_metadata([path])
    assert res.formats[path] == "ytdlp"
    rows = _by_id(res)
    bread = rows["CCCCCCCCCCC"]
    assert bread["category_id"] == 26 and bread["category_name"] == "Howto & Style"
    assert bread["channel_title"] == "Bake Channel" and bread["publish_time"] == "2024-01-02"
    assert rows["DDDDDDDDDDD"]["channel_title"] == "Uploader" and rows["DDDDDDDDDDD"]["category_id"] == 42


def test_several_inputs_collapse_across_files(tmp_path):
    extra = tmp_path / "more.csv"
    extra.write_text("video_id,title\n2kyS6SvSYSE,Casey again\nZZZZZZZZZZZ,New one\n")
    res = metadata.read_metadata([os.path.join(FIX, "USvideos.csv"), str(extra)])
    assert len(res.rows) == 5 and res.duplicates == 2


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input matched no readable file"):
        metadata.read_metadata([str(tmp_path / "nope.csv")])
    bad = tmp_path / "nocol.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no video id column"):
        metadata.read_metadata([str(bad)])
    with pytest.raises(ValueError, match="--input-format"):
        metadata.read_metadata([str(bad)], "xml")


def test_csv_rows_with_extra_fields_are_rejected_not_dropped(tmp_path):
    # An unquoted comma in a title gives a row more fields than the header. pandas dropped such a
    # row with a warning only (not counted, not reported), and when it was the first data row it
    # took the ids for an index and shifted every column of the file.
    middle = tmp_path / "middle.csv"
    middle.write_text(
        "video_id,title,tags\nokokokokok1,fine,a\nokokokokok2,Hello, world,b\nokokokokok3,x,c\n"
    )
    first = tmp_path / "first.csv"
    first.write_text("video_id,title\nokokokokok4,Hi, there\nokokokokok5,fine\n")
    res = metadata.read_metadata([str(middle), str(first)])
    assert res.input_rows == 5
    assert sorted(_by_id(res)) == ["okokokokok1", "okokokokok3", "okokokokok5"]
    assert _by_id(res)["okokokokok5"]["title"] == "fine"
    assert [r["reason"] for r in res.rejected] == [
        "malformed CSV row at line 3 (4 fields, header has 3)",
        "malformed CSV row at line 2 (3 fields, header has 2)",
    ]
    assert res.rejected[0]["record"]["fields"] == ["okokokokok2", "Hello", " world", "b"]


@pytest.mark.parametrize(
    "name,text,where,kind",
    [
        ("nulls.jsonl", '{"video_id": "okokokokok1"}\nnull\n', ":2:", "null"),
        ("lists.jsonl", '{"video_id": "okokokokok1"}\n\n["okokokokok2"]\n', ":3:", "an array"),
        ("strs.jsonl", '"okokokokok2"\n', ":1:", "a string"),
        ("array.json", '[\n {"video_id": "okokokokok1"},\n  "okokokokok2"\n]\n', ":3:", "a string"),
    ],
)
def test_json_records_that_are_not_objects_name_the_line(tmp_path, name, text, where, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(metadata.MetadataError) as err:
        metadata.read_metadata([str(path)])
    message = str(err.value)
    assert message.startswith(f"{path}{where}") and f"{kind}, not" in message and "\n" not in message
    assert "one JSON object per line" in message or "one object per video" in message


def test_json_byte_order_mark_and_encoding(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"video_id": "okokokokok1", "title": "x"}\n')
    arr = tmp_path / "bom.json"
    arr.write_bytes(b'\xef\xbb\xbf[{"video_id": "okokokokok2"}]')
    assert sorted(_by_id(metadata.read_metadata([str(bom), str(arr)]))) == ["okokokokok1", "okokokokok2"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"video_id": "okokokokok1"}\n{"video_id": "okokokokok2", "title": "caf\xe9"}\n')
    with pytest.raises(
        metadata.MetadataError, match=r"latin.jsonl:2: not UTF-8 .* re-save the file as UTF-8"
    ):
        metadata.read_metadata([str(latin)])


def test_id_comes_from_the_first_valid_candidate_column(tmp_path):
    # A numeric row id in `id` before the real `url`: the first non-empty value was not an id.
    path = tmp_path / "table.csv"
    path.write_text("id,url,title\n1,https://youtu.be/okokokokok1,a\n2,nonsense,b\n,okokokokok3,c\n")
    res = metadata.read_metadata([str(path)])
    assert sorted(_by_id(res)) == ["okokokokok1", "okokokokok3"]
    assert [r["reason"] for r in res.rejected] == ["invalid video id"] and res.input_rows == 3


def test_ids_and_categories_edge_values(tmp_path):
    # `$` matched before a trailing newline: watch?v=<id>%0A gave an id ending in "\n".
    assert youtube.normalize_video_id("https://www.youtube.com/watch?v=abcdefghijk%0A") is None
    assert youtube.normalize_video_id("https://youtu.be/abcdefghijk%0A") is None
    for value in ("inf", "1e999", "-inf", "nan"):
        assert youtube.parse_category_id(value) is None  # was OverflowError for inf
    path = tmp_path / "cats.csv"
    path.write_text("video_id,category_id\nokokokokok1,inf\nokokokokok2,1e999\n")
    rows = _by_id(metadata.read_metadata([str(path)]))
    assert all(r["category_id"] is None and r["category_name"] == "" for r in rows.values())


def test_inputs_are_literal_paths_and_globs_must_match(tmp_path):
    odd = tmp_path / "US [2018].csv"  # as a glob, [2018] is one character of "2018"
    odd.write_text("video_id,title\nokokokokok1,a\n")
    assert metadata.expand_inputs([str(odd)]) == [str(odd)]
    folder = tmp_path / "by [year]"
    folder.mkdir()
    (folder / "a.csv").write_text("video_id\nokokokokok2\n")
    assert metadata.expand_inputs([str(folder)]) == [str(folder / "a.csv")]
    with pytest.raises(FileNotFoundError, match=r"--input .*\*\.jsonl: matches no metadata file"):
        metadata.expand_inputs([str(odd), str(tmp_path / "*.jsonl")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="matches no metadata file"):
        metadata.expand_inputs([str(odd), str(empty)])


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("nocol.csv", "foo,bar\n1,2\n", "no video id column.*Rename the id or URL column"),
        ("empty.csv", "", "empty.csv: empty file"),
        ("empty.jsonl", "\n", "empty.jsonl: no records"),
    ],
)
def test_unreadable_tables_are_metadata_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(metadata.MetadataError, match=match):
        metadata.read_metadata([str(path)])


def test_literal_quote_inside_a_field_is_not_an_unclosed_quote(tmp_path):
    # A quote inside an unquoted field (an inch mark) is a literal character for pandas and the
    # csv module. Counting every quote in the file blamed that title for an "unclosed quote" and
    # stopped the build, instead of rejecting the row with an unquoted comma further down.
    path = tmp_path / "inches.csv"
    path.write_text(
        'video_id,title,tags\nokokokokok1,Samsung 65" TV review,tv\n'
        'okokokokok2,Hello, world,b\nokokokokok3,"quoted ""x"", fine",c\n'
    )
    res = metadata.read_metadata([str(path)])
    assert res.input_rows == 3
    assert _by_id(res)["okokokokok1"]["title"] == 'Samsung 65" TV review'
    assert _by_id(res)["okokokokok3"]["title"] == 'quoted "x", fine'
    assert [r["reason"] for r in res.rejected] == ["malformed CSV row at line 3 (4 fields, header has 3)"]
    tsv = tmp_path / "inches.tsv"  # the same rule with tabs: the quote after a tab opens a field
    tsv.write_text('video_id\ttitle\nokokokokok1\t7" tablet\nokokokokok2\ta\tb\nokokokokok3\t"never closed\n')
    # A quote that never closes costs only its own line, read as written (it stopped the build).
    res = metadata.read_metadata([str(tsv)])
    assert res.input_rows == 3
    assert _by_id(res)["okokokokok1"]["title"] == '7" tablet'
    assert _by_id(res)["okokokokok3"]["title"] == '"never closed'
    assert [r["reason"] for r in res.rejected] == ["malformed CSV row at line 3 (3 fields, header has 2)"]


def test_utf8_file_with_a_few_bad_bytes_keeps_its_titles(tmp_path, capsys):
    # A scraper that cuts descriptions at a byte limit leaves half a character in a UTF-8 file.
    # Read as latin-1, every Cyrillic/Japanese title of the file became mojibake (silently bad
    # captions); only the bad bytes should be lost. A real latin-1 file still reads as latin-1.
    text = "video_id,title,description\nokokokokok1,Привет мир,ok\nokokokokok2,日本語のタイトル,CUT\n"
    damaged = tmp_path / "RUvideos.csv"
    damaged.write_bytes(text.encode().replace(b"CUT", "ок".encode()[:3]))
    rows = _by_id(metadata.read_metadata([str(damaged)]))
    assert rows["okokokokok1"]["title"] == "Привет мир"
    assert rows["okokokokok2"]["title"] == "日本語のタイトル"
    assert "1 invalid UTF-8 sequence(s) (the first on line 3)" in capsys.readouterr().out
    with_extra_field = tmp_path / "extra.csv"  # the csv-module path (a malformed row) too
    with_extra_field.write_bytes(damaged.read_bytes() + "okokokokok3,Да, нет,x\n".encode())
    res = metadata.read_metadata([str(with_extra_field)])
    assert _by_id(res)["okokokokok1"]["title"] == "Привет мир" and len(res.rejected) == 1
    latin = tmp_path / "FRvideos.csv"
    latin.write_bytes("video_id,title\nokokokokok1,Café crème à la française\n".encode("latin-1"))
    assert _by_id(metadata.read_metadata([str(latin)]))["okokokokok1"]["title"] == "Café crème à la française"


def test_folder_input_reads_every_extension_the_readers_take(tmp_path):
    # A folder's .tsv.gz / .json.gz files and upper-case names (US.CSV) were skipped without a
    # word (their rows never counted), though each reads fine when named directly.
    import gzip

    (tmp_path / "a.csv").write_text("video_id,title\nokokokokok1,a\n")
    (tmp_path / "US.CSV").write_text("video_id,title\nokokokokok2,b\n")
    (tmp_path / "c.tsv.gz").write_bytes(gzip.compress(b"video_id\ttitle\nokokokokok3\tc\n"))
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(b'{"video_id": "okokokokok4"}\n'))
    (tmp_path / "notes.txt").write_text("not metadata\n")
    res = metadata.read_metadata([str(tmp_path)])
    assert sorted(_by_id(res)) == ["okokokokok1", "okokokokok2", "okokokokok3", "okokokokok4"]
    assert res.input_rows == 4


def test_json_numbers_keep_their_text_when_a_key_is_missing(tmp_path):
    # pandas gave a column with a missing key the float dtype: the title 5 became "5.0".
    path = tmp_path / "v.jsonl"
    lines = [{"id": "okokokokok1", "title": 5, "tags": [2024]}, {"id": "okokokokok2", "tags": ["x"]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = _by_id(metadata.read_metadata([str(path)]))
    assert rows["okokokokok1"]["title"] == "5" and rows["okokokokok2"]["title"] == ""


def test_rejected_rows_name_the_line_they_start_on(tmp_path):
    # The source was the record's index: one line too early in every CSV (the header), and
    # further off after a blank line or a title spanning lines.
    csv_path = tmp_path / "v.csv"
    csv_path.write_text('video_id,title\nbad,x\n\nokokokokok1,"two\nlines"\nbad2,y\n')
    jsonl_path = tmp_path / "v.jsonl"
    jsonl_path.write_text('{"id": "okokokokok2"}\n\n{"id": "bad"}\n')
    array_path = tmp_path / "a.json"
    array_path.write_bytes(b'\xef\xbb\xbf[\n  {"id": "okokokokok3"},\n  {\n    "id": "bad"\n  }\n]\n')
    parquet_path = tmp_path / "v.parquet"
    pd.DataFrame({"video_id": ["okokokokok4", "bad"]}).to_parquet(parquet_path)
    res = metadata.read_metadata([str(p) for p in (csv_path, jsonl_path, array_path, parquet_path)])
    assert [r["source"] for r in res.rejected] == [
        f"{csv_path}:2",
        f"{csv_path}:6",
        f"{jsonl_path}:3",
        f"{array_path}:3",
        f"{parquet_path} row 2",  # no lines in a parquet file
    ]


def test_pipe_joined_tags_with_bracketed_first_and_last_tag(tmp_path):
    # The newer Kaggle schema joins tags with bare "|": "[MV]|BTS|Dynamite [MV]" starts with "["
    # and ends with "]", and was read as a list literal: one tag "MV]|BTS|Dynamite [MV".
    path = tmp_path / "trending.csv"
    path.write_text(
        "video_id,trending_date,title,tags\nokokokokok1,2020-08-12T00:00:00Z,t,[MV]|BTS|Dynamite [MV]\n"
    )
    assert _by_id(metadata.read_metadata([str(path)]))["okokokokok1"]["tags"] == [
        "[MV]",
        "BTS",
        "Dynamite [MV]",
    ]
    assert youtube.parse_tags("['a', 'b|c']") == ["a", "b|c"]  # a Python-style list is still a list
    assert youtube.parse_tags('["a|b", "c"]') == ["a|b", "c"]  # and a JSON one keeps its "|"


def test_missing_parquet_dates_do_not_win_the_collapse(tmp_path):
    # A missing timestamp (NaT) became the text "NaT", which sorts after every ISO date: the
    # undated duplicate won as the "newest" row and "NaT" landed in the shard metadata.
    path = tmp_path / "trending.parquet"
    pd.DataFrame(
        {
            "video_id": ["okokokokok1", "okokokokok1"],
            "title": ["dated", "undated"],
            "trending_date": pd.to_datetime(["2020-08-13", None]),
            "publish_time": pd.to_datetime([None, "2020-08-11"]),
        }
    ).to_parquet(path)
    row = _by_id(metadata.read_metadata([str(path)]))["okokokokok1"]
    assert row["title"] == "dated" and row["trending_date"] == "2020-08-13"
    assert row["publish_time"].startswith("2020-08-11")  # the gap filled from the undated row


def _plan(rows: list[dict]) -> list:
    """The build's plan of `rows` (10 per shard, the default URL ladder)."""
    from dataset_tools import plan

    return plan.extend_plan(
        [],
        rows,
        shard_size=10,
        oom_shard_count=5,
        caption_template="{title}",
        url_template=youtube.DEFAULT_URL_TEMPLATE,
        first_variant="hqdefault",
    )


def test_out_of_range_category_id_does_not_stop_the_plan(tmp_path):
    # 3000000000 passed as a category id and the plan's int32 column raised ArrowInvalid (a
    # traceback after the whole input was read).
    from dataset_tools import plan

    path = tmp_path / "v.csv"
    path.write_text("video_id,title,category_id\nokokokokok1,a,3000000000\nokokokokok2,b,24\n")
    rows = metadata.read_metadata([str(path)]).rows
    planned = _plan(rows)
    plan.save_plan(str(tmp_path / "out"), planned)
    by_id = {r["video_id"]: r for r in plan.load_plan(str(tmp_path / "out"))}
    assert by_id["okokokokok1"]["category_id"] is None and by_id["okokokokok1"]["category_name"] == ""
    assert by_id["okokokokok2"]["category_id"] == 24


def test_lone_surrogates_from_json_do_not_stop_the_build(tmp_path):
    # JSON "\ud83d" (an emoji cut in half by a scraper) decodes to a lone surrogate, which UTF-8
    # cannot encode: the plan's parquet and rejected_input.jsonl both raised UnicodeEncodeError.
    from dataset_tools import plan
    from dataset_tools.cli import main

    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"id": "okokokokok1", "title": "cut \\ud83d", "tags": ["a\\udc00"]}\n')
    rows = metadata.read_metadata([str(valid)]).rows
    assert rows[0]["title"] == "cut \ufffd" and rows[0]["tags"] == ["a\ufffd"]
    planned = _plan(rows)
    plan.save_plan(str(tmp_path / "plan_out"), planned)
    assert plan.load_plan(str(tmp_path / "plan_out"))[0]["caption"] == "cut \ufffd"

    rejected_only = tmp_path / "rejected.jsonl"  # no valid row: the build downloads nothing
    rejected_only.write_text('{"id": "bad", "title": "cut \\ud83d"}\n')
    out = tmp_path / "out"
    assert main(["build", "--input", str(rejected_only), "--output", str(out)]) == 0
    with open(out / "_build" / "rejected_input.jsonl", encoding="utf-8") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["reason"] == "invalid video id" and record["record"]["title"] == "cut \ud83d"


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"items": "x"}'], ids=["broken", "list", "items"]
)
def test_a_bad_category_json_is_one_line(tmp_path, capsys, content):
    # A broken --categories-json (or a Kaggle <region>_category_id.json beside the input) was a
    # JSONDecodeError / AttributeError traceback.
    from dataset_tools.cli import main

    (tmp_path / "US_category_id.json").write_text(content)
    videos = tmp_path / "USvideos.csv"
    videos.write_text("video_id,title,category_id\nokokokokok1,a,24\n")
    assert main(["build", "--input", str(videos), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "US_category_id.json: not a videoCategories JSON" in err[0]
    )
