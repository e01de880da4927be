"""Review of the metadata readers (third pass): rows a quote swallowed or a whole file lost, tags
joined with commas, parquet dates, and yt-dlp records from other sites."""

import json

import pandas as pd

from dataset_tools import metadata


def _titles(result):
    return {r["video_id"]: r["title"] for r in result.rows}


def test_an_unclosed_quote_costs_one_row_not_the_file(tmp_path):
    # A title opening a double quote it never closes (`"Best of`: TSV exports do not quote) was
    # read as a quoted field running to the next quote: in a TSV three videos became one
    # rejected row, in a CSV the build stopped. That row is now read as written, the rest kept,
    # and rejection lines still name the row they come from.
    tsv = tmp_path / "videos.tsv"
    tsv.write_text(
        "video_id\ttitle\ttags\n"
        'aaaaaaaaaaa\t"Best of 2020\tx\n'
        "bbbbbbbbbbb\tSecond\ty\n"
        'ccccccccccc\t"quoted\ttitle"\tz\n'
        'toolong12345\t"opened\tq\n'
    )
    result = metadata.read_metadata([str(tsv)])
    assert _titles(result) == {
        "aaaaaaaaaaa": '"Best of 2020',
        "bbbbbbbbbbb": "Second",
        "ccccccccccc": "quoted title",
    }
    assert result.input_rows == 4
    assert [(r["source"], r["reason"]) for r in result.rejected] == [(f"{tsv}:5", "invalid video id")]

    csv = tmp_path / "videos.csv"
    csv.write_text(
        "video_id,title,tags\n"
        'aaaaaaaaaaa,"Best of 2020,x\n'
        "bbbbbbbbbbb,Second,y\n"
        'ccccccccccc,"Best of, vol 2,z\n'
    )
    result = metadata.read_metadata([str(csv)])
    assert _titles(result) == {"aaaaaaaaaaa": '"Best of 2020', "bbbbbbbbbbb": "Second"}
    assert [(r["source"], r["reason"]) for r in result.rejected] == [
        (
            f"{csv}:4",
            "malformed CSV row at line 4 (an unclosed double quote, read as written: 4 fields, header has 3)",
        )
    ]


def test_a_quote_that_closes_inside_a_field_swallows_no_rows(tmp_path):
    # Read with quoting, the quote on line 2 closed at line 4's quote and the three rows were one
    # row of the header's width: video 1 with a title holding videos 2 and 3, both lost silently.
    src = tmp_path / "videos.csv"
    src.write_text(
        'video_id,title,tags\naaaaaaaaaaa,"Live,x\nbbbbbbbbbbb,Two,y\nccccccccccc,"Three" remix,z\n'
    )
    result = metadata.read_metadata([str(src)])
    assert _titles(result) == {
        "aaaaaaaaaaa": '"Live',
        "bbbbbbbbbbb": "Two",
        "ccccccccccc": '"Three" remix',
    }
    assert result.rejected == []


def test_comma_joined_tags_are_a_list(tmp_path):
    # Scraper CSVs and YouTube Studio join tags with commas; "music,live,rock" stayed one tag.
    src = tmp_path / "videos.csv"
    src.write_text(
        "video_id,title,tags\n"
        'aaaaaaaaaaa,one,"music, live,rock"\n'
        'bbbbbbbbbbb,two,"a,b|c"\n'
        'ccccccccccc,three,"[""x"", ""y,z""]"\n'
    )
    tags = {r["video_id"]: r["tags"] for r in metadata.read_metadata([str(src)]).rows}
    assert tags == {
        "aaaaaaaaaaa": ["music", "live", "rock"],
        "bbbbbbbbbbb": ["a,b", "c"],  # a "|" list keeps its commas
        "ccccccccccc": ["x", "y,z"],
    }


def test_parquet_dates_read_as_text_dates_do(tmp_path):
    # A timestamp column came out as str(Timestamp), "2020-01-02 00:00:00", where the same date
    # given as yt-dlp text 20200102 is "2020-01-02".
    src = tmp_path / "videos.parquet"
    pd.DataFrame(
        {
            "id": ["aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"],
            "title": ["a", "b", "c"],
            "upload_date": [pd.Timestamp("2020-01-02"), pd.Timestamp("2020-01-02 10:30"), pd.NaT],
        }
    ).to_parquet(src)
    text = tmp_path / "videos.jsonl"
    text.write_text(json.dumps({"id": "ddddddddddd", "upload_date": "20200102", "extractor": "youtube"}))
    published = {r["video_id"]: r["publish_time"] for r in metadata.read_metadata([str(src), str(text)]).rows}
    assert published == {
        "aaaaaaaaaaa": "2020-01-02",
        "bbbbbbbbbbb": "2020-01-02T10:30:00",
        "ccccccccccc": "",
        "ddddddddddd": "2020-01-02",
    }


def test_yt_dlp_records_from_other_sites_are_rejected_with_their_extractor(tmp_path):
    # An 11-character id from Vimeo or Dailymotion passed as a YouTube id and every variant of
    # its "thumbnail" failed later; a flat-playlist entry names its site in ie_key.
    src = tmp_path / "dump.jsonl"
    records = [
        {"id": "aaaaaaaaaaa", "title": "vimeo clip", "extractor": "vimeo"},
        {"id": "bbbbbbbbbbb", "title": "yt", "extractor": "youtube"},
        {"id": "ccccccccccc", "title": "tab", "extractor_key": "YoutubeTab"},
        {"_type": "url", "id": "ddddddddddd", "ie_key": "Dailymotion", "url": "https://dai.ly/x"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = metadata.read_metadata([str(src)])
    assert sorted(_titles(result)) == ["bbbbbbbbbbb", "ccccccccccc"]
    assert result.input_rows == 4
    assert [(r["source"], r["reason"]) for r in result.rejected] == [
        (f"{src}:1", "not a YouTube video (yt-dlp extractor 'vimeo')"),
        (f"{src}:4", "not a YouTube video (yt-dlp extractor 'Dailymotion')"),
    ]
