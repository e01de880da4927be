"""Review of the download half of the dataset tools: metadata rows that were lost or stopped the
build, and the fetch against the loopback host."""

import json

from dataset_tools import metadata


def test_jsonl_title_with_a_unicode_line_separator_is_one_record(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 unescaped inside a string (json.dumps with
    # ensure_ascii=False writes them so); str.splitlines cut such a line in two and the build
    # stopped with "not a JSON line". The rejected row's line must count "\n" only, too: the
    # latin-1 view of "Å"/"х" holds a 0x85 byte that splitlines also took for a line break.
    src = tmp_path / "videos.jsonl"
    good = {"id": "dQw4w9WgXcQ", "title": "first\u2028second\u2029third\u0085end", "extractor": "youtube"}
    bad = {"id": "not-an-id", "title": "Åх", "extractor": "youtube"}
    src.write_text(
        json.dumps(good, ensure_ascii=False) + "\r\n\n" + json.dumps(bad, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    result = metadata.read_metadata([str(src)])
    assert [r["video_id"] for r in result.rows] == ["dQw4w9WgXcQ"]
    assert result.rows[0]["title"] == "first second third end"
    assert result.input_rows == 2
    assert [r["source"] for r in result.rejected] == [f"{src}:3"]


def test_a_nul_in_a_csv_field_keeps_the_rest_of_the_field(tmp_path):
    # pandas' C parser ends a field at a NUL byte and drops the rest of it without a word: the
    # title "Live<NUL> at Wembley" became "Live". A control character is also no caption text.
    src = tmp_path / "videos.csv"
    src.write_bytes(
        b"video_id,title,tags\n"
        b"abcdefghijk,Live\x00 at Wembley,rock|live\x07set\n"
        b"bcdefghijkl,\x1b[1mBold\x1b[0m,x\n"
        b"toolong12345,kept in rejected,\n"
    )
    result = metadata.read_metadata([str(src)])
    titles = {r["video_id"]: r["title"] for r in result.rows}
    assert titles == {"abcdefghijk": "Live at Wembley", "bcdefghijkl": "[1mBold [0m"}
    assert result.rows[0]["tags"] == ["rock", "live set"]
    assert [(r["source"], r["record"]["title"]) for r in result.rejected] == [
        (f"{src}:4", "kept in rejected")
    ]


def _video(video_id, title):
    return {"id": video_id, "title": title, "extractor": "youtube"}


def test_a_yt_dlp_playlist_dump_gives_its_videos(tmp_path):
    # `yt-dlp -J PLAYLIST` writes one object whose "entries" are the videos (nested for a
    # channel's tabs, null for an entry it could not extract). Read as one video, the playlist id
    # was one "invalid video id" rejection and every video in it was lost.
    playlist = {
        "_type": "playlist",
        "id": "PLx0sYbCqOb8TBPRdmBHs5Iftvv9TPboYG",
        "extractor": "youtube:tab",
        "entries": [
            _video("dQw4w9WgXcQ", "one"),
            {"_type": "url", "id": "abcdefghijk", "url": "https://youtu.be/abcdefghijk", "title": "two"},
            None,
            {"_type": "playlist", "id": "UUchannel", "entries": [_video("bcdefghijkl", "three")]},
        ],
    }
    one_line = tmp_path / "playlist.json"
    one_line.write_text(json.dumps(playlist))
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(playlist, indent=2))  # `yt-dlp -J ... | jq .`
    for src in (one_line, pretty):
        result = metadata.read_metadata([str(src)])
        assert [r["video_id"] for r in result.rows] == ["dQw4w9WgXcQ", "abcdefghijk", "bcdefghijkl"]
        assert result.input_rows == 4 and len(result.rejected) == 1
        assert result.rejected[0]["record"]["playlist_index"] == "3"
    # Playlists as JSON lines beside single videos: each rejection names its line, and keys a
    # line lacks are left out of its record (they were written as the text "nan").
    lines = tmp_path / "mixed.jsonl"
    lines.write_text(json.dumps(_video("cdefghijklm", "four")) + "\n" + json.dumps(playlist) + "\n")
    lines.write_text(lines.read_text() + json.dumps({"id": "short"}) + "\n")
    result = metadata.read_metadata([str(lines)])
    assert len(result.rows) == 4 and result.input_rows == 6
    assert [r["source"] for r in result.rejected] == [f"{lines}:2", f"{lines}:3"]
    assert result.rejected[1]["record"] == {"id": "short"}
