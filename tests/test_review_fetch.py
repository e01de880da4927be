"""Review of the thumbnail download path: ids from URLs, and the fetch against the loopback host."""

from dataset_tools import fetch, metadata, youtube
from dataset_tools.fake_host import FakeThumbnailHost
from dataset_tools.politeness import HostLimiter, PolitenessConfig


def test_playlist_and_live_stream_embeds_are_rejected_not_one_video(tmp_path):
    # "videoseries" and "live_stream" have the shape of an id; every playlist/live embed was
    # taken for one video of that "id", its rows counted as duplicates instead of rejected.
    src = tmp_path / "links.csv"
    src.write_text(
        "url,title\n"
        "https://www.youtube.com/embed/videoseries?list=PLx0sYbCqOb8TBPRdmBHs5Iftvv9TPboYG,playlist 1\n"
        "https://www.youtube.com/embed/videoseries?list=PLaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa,playlist 2\n"
        "https://www.youtube.com/embed/live_stream?channel=UCxxxxxxxxxxxxxxxxxxxxxx,live\n"
        "https://www.youtube.com/embed/dQw4w9WgXcQ,a video\n"
    )
    result = metadata.read_metadata([str(src)])
    assert [r["video_id"] for r in result.rows] == ["dQw4w9WgXcQ"]
    assert result.duplicates == 0 and len(result.rejected) == 3
    assert {r["reason"] for r in result.rejected} == {"invalid video id"}
    # A playlist embed that also names its first video keeps that video.
    embed = "https://www.youtube.com/embed/videoseries?v=dQw4w9WgXcQ&list=PL1"
    assert youtube.normalize_video_id(embed) == "dQw4w9WgXcQ"


def test_protocol_relative_urls_give_their_id():
    # <iframe src="//www.youtube.com/embed/ID">, scraped as is: it was rejected as an invalid id.
    for url in (
        "//www.youtube.com/embed/dQw4w9WgXcQ",
        "//youtu.be/dQw4w9WgXcQ",
        "//youtube.com/watch?v=dQw4w9WgXcQ",
    ):
        assert youtube.normalize_video_id(url) == "dQw4w9WgXcQ"
    assert youtube.normalize_video_id("//example.com/embed/dQw4w9WgXcQ") is None


def test_a_truncated_chunked_body_falls_to_the_next_rung():
    # Without a Content-Length (chunked), a body cut short raised http.client.IncompleteRead:
    # recorded as the host's trouble ("connection error: IncompleteRead"), it stopped the ladder
    # where a truncated body falls to the next variant after its retries.
    cfg = PolitenessConfig(retries=1, backoff_base=0.01, deadline=5.0, requests_per_second=0)
    with FakeThumbnailHost({"chunkedcut1": "chunked_truncated_maxres"}, max_lifetime=60) as host:
        result = fetch.fetch_ladder(
            "chunkedcut1", ("maxresdefault", "sddefault"), host.url_template, cfg, HostLimiter(4, 0)
        )
    assert result.error is None and result.variant == "sddefault"
    assert result.trail == ["maxresdefault:truncated", "sddefault:ok"]
    assert result.attempts == 3  # the cut rung was retried once, like any truncated body
