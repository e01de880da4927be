"""Review of the thumbnail fetch: odd response headers against the real fetch path (a loopback
server on 127.0.0.1, real sockets, urllib, PIL)."""

from loopback_images import JpegHandler, QuietHandler, fetch_row, serving

from dataset_tools import fetch
from dataset_tools.fake_host import render_thumbnail

BODY = render_thumbnail("odd_length1", "maxresdefault")


class _OddLength(QuietHandler):
    """Answers every GET with a whole JPEG whose Content-Length is '²' (latin-1 byte 0xB2),
    then closes the connection, so the body's end is the end of the stream."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "\u00b2")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(BODY)


def test_a_content_length_of_non_ascii_digits_is_read_to_the_end_not_an_internal_error():
    # str.isdigit takes '²', int() did not: the row failed at once as "internal fetch error:
    # ValueError(...)" without trying the body, which http.client reads to the end like any
    # response without a usable Content-Length.
    with serving(_OddLength) as template:
        result = fetch_row("odd_length1", ["maxresdefault"], template)
    assert result.error is None and result.trail == ["maxresdefault:ok"]
    assert result.body == BODY and result.attempts == 1


class _Frames(JpegHandler):
    """Serves a real 120x90 picture for every path, as YouTube does for the frames 1, 2 and 3."""

    def body(self, path):
        return render_thumbnail(path, "default")


def test_the_120x90_video_frames_are_thumbnails_not_placeholders():
    # Only "default" was exempt from the 120x90 placeholder rule, so --variants ...,1 (YouTube's
    # 120x90 frame from the video) failed every row as "every variant missing".
    with serving(_Frames) as template:
        frames = [fetch_row("frame_vid01", [v], template) for v in "123"]
        grey = fetch_row("frame_vid01", ["hqdefault"], template)
    assert [r.trail for r in frames] == [["1:ok"], ["2:ok"], ["3:ok"]]
    assert all(r.error is None and r.body for r in frames)
    # Any other variant at 120x90 is still YouTube's placeholder.
    assert grey.trail == ["hqdefault:placeholder"] and grey.error == fetch.ERR_ALL_MISSING
