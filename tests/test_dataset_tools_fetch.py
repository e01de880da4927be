"""The polite ladder fetch against the loopback fake thumbnail host (no img2dataset involved)."""

import hashlib
import threading
import time

import pytest
from recording_limiter import RecordingLimiter

from dataset_tools import fetch
from dataset_tools.fake_host import PLACEHOLDER, FakeThumbnailHost
from dataset_tools.politeness import HostLimiter, PolitenessConfig, backoff_delay, parse_retry_after

VARIANTS = ("maxresdefault", "sddefault", "hqdefault", "mqdefault")
BEHAVIOURS = {
    "okokokokok1": "ok",
    "nomaxres001": "no_maxres",
    "nomaxressd1": "no_maxres_sd",
    "placehold01": "placeholder200",
    "missing0001": "missing",
    "throttle001": "throttle",
    "error500001": "error500",
    "slow0000001": "slow",
    "truncated01": "truncated",
    "notimage001": "notimage",
    "hugepixels1": "huge_pixels",
    "hugebytes01": "huge_bytes",
    "noai0000001": "noai",
    "truncmaxres": "truncated_maxres",
    "htmlmaxres1": "notimage_maxres",
    "greymaxres1": "grey_maxres",
    "unavail5031": "unavailable503",
}
CFG = PolitenessConfig(
    max_connections=4,
    requests_per_second=0,
    retries=1,
    backoff_base=0.05,
    backoff_max=5,
    deadline=1.0,
    max_bytes=1024 * 1024,
    max_pixels=2000 * 2000,
)


@pytest.fixture(scope="module")
def host():
    with FakeThumbnailHost(BEHAVIOURS, slow_seconds=2.0, max_lifetime=120) as h:
        yield h


def _ladder(host, vid, cfg=CFG):
    return fetch.fetch_ladder(vid, VARIANTS, host.url_template, cfg, HostLimiter(cfg.max_connections, 0))


@pytest.mark.parametrize(
    "vid,variant,attempts",
    [
        ("okokokokok1", "maxresdefault", 1),
        ("nomaxres001", "sddefault", 2),
        ("nomaxressd1", "hqdefault", 3),
        ("placehold01", "sddefault", 2),
    ],
)
def test_ladder_falls_through_404_and_placeholders(host, vid, variant, attempts):
    res = _ladder(host, vid)
    assert res.error is None and res.variant == variant and res.attempts == attempts
    assert res.url.endswith(f"/{vid}/{variant}.jpg")
    assert hashlib.sha256(res.body).digest() != hashlib.sha256(PLACEHOLDER).digest()
    assert fetch.check_image(res.body, CFG)[0] != (120, 90)


def test_all_variants_missing(host):
    res = _ladder(host, "missing0001")
    assert res.body is None and res.error == fetch.ERR_ALL_MISSING
    assert res.trail == [f"{v}:404" for v in VARIANTS]


def test_429_honours_retry_after(host):
    res = _ladder(host, "throttle001")
    assert res.error is None and res.attempts == 2
    # Behaviour, not speed: the second request came no earlier than Retry-After: 1 allows
    # (the configured backoff alone would have waited only ~0.05 s).
    hits = [r["time"] for r in host.requests if r["video_id"] == "throttle001"]
    assert len(hits) == 2 and hits[1] - hits[0] >= 0.95


def test_500_then_success(host):
    res = _ladder(host, "error500001")
    assert res.error is None and res.variant == "maxresdefault" and res.attempts == 2


def test_slow_response_hits_deadline(host):
    res = _ladder(host, "slow0000001")
    # 1 s deadline vs a 2 s server: both attempts time out, and the ladder stops there (a
    # timeout is not a missing variant, so sddefault is never asked for).
    assert res.body is None and res.error.startswith(fetch.ERR_DEADLINE) and res.attempts == 2
    assert {r["variant"] for r in host.requests if r["video_id"] == "slow0000001"} == {"maxresdefault"}


@pytest.mark.parametrize(
    "vid,reason",
    [
        ("truncated01", fetch.ERR_TRUNCATED),
        ("notimage001", fetch.ERR_NOT_IMAGE),
        ("hugepixels1", fetch.ERR_TOO_MANY_PIXELS),
        ("hugebytes01", fetch.ERR_TOO_BIG),
        ("noai0000001", fetch.ERR_ROBOTS),
    ],
)
def test_bad_responses_fail_with_reason(host, vid, reason):
    res = _ladder(host, vid)
    assert res.body is None and res.error.startswith(reason)
    if reason != fetch.ERR_ROBOTS:  # a bad body falls to the next rung: every rung was tried
        assert [t.split(":")[0] for t in res.trail] == list(VARIANTS), res.trail


@pytest.mark.parametrize(
    "vid,code",
    [
        ("truncmaxres", "truncated"),
        ("htmlmaxres1", "not_image"),
        ("greymaxres1", "placeholder"),
    ],
)
def test_bad_top_rung_falls_to_the_next(host, vid, code):
    """An HTML page served as image/jpeg, a truncated body or a full-size grey placeholder on
    maxresdefault: the video still gets its sddefault thumbnail, and the trail says why."""
    res = _ladder(host, vid)
    assert res.error is None and res.variant == "sddefault", res
    assert res.trail == [f"maxresdefault:{code}", "sddefault:ok"]


def test_placeholder_is_recognised_by_content():
    from dataset_tools.fake_host import render_placeholder, render_thumbnail

    for size in ((120, 90), (480, 360), (1280, 720)):
        assert fetch.is_placeholder(render_placeholder(size)), size
    for vid in ("okokokokok1", "nomaxres001", "greymaxres1"):
        assert not fetch.is_placeholder(render_thumbnail(vid, "hqdefault"))
    assert not fetch.is_placeholder(b"<html></html>")


def test_robots_can_be_ignored_and_user_agent_is_identifiable(host):
    cfg = PolitenessConfig(**{**CFG.__dict__, "disallowed_directives": ()})
    assert _ladder(host, "noai0000001", cfg).error is None
    agents = {r["user_agent"] for r in host.requests}
    assert agents == {CFG.user_agent} and "vutrain" in CFG.user_agent


def test_retry_after_and_backoff():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    cfg = PolitenessConfig(backoff_base=1.0, backoff_max=10.0)
    for attempt in range(6):
        delay = backoff_delay(attempt, cfg)
        assert min(10.0, 2**attempt) / 2 <= delay <= min(10.0, 2**attempt)
    assert backoff_delay(0, cfg, retry_after=7) == 7 and backoff_delay(0, cfg, retry_after=99) == 10


def test_rate_limit_spaces_requests():
    limiter = HostLimiter(max_connections=8, requests_per_second=20)
    start = time.monotonic()
    for _ in range(6):
        limiter.acquire()
        limiter.release()
    assert time.monotonic() - start >= 5 / 20 * 0.9  # behaviour: 6 requests need 5 gaps of 50 ms


def test_cool_down_holds_back_a_request_already_waiting():
    # A thread waiting for its rate token must also wait out a cool-down set meanwhile (a 429
    # seen by another thread); it used to go out at the time it had computed before.
    limiter = HostLimiter(max_connections=4, requests_per_second=10)
    limiter.acquire()  # takes the token: the next request may start 0.1 s later
    limiter.release()
    started = {}

    def second():
        limiter.acquire()
        started["at"] = time.monotonic()
        limiter.release()

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.03)  # the thread is asleep until its token
    cooled_at = time.monotonic()
    limiter.cool_down(0.5)
    thread.join(5)
    assert started["at"] - cooled_at >= 0.45


def test_503_without_retry_after_cools_down_every_thread(host):
    limiter = RecordingLimiter()
    url = host.url_template.format(video_id="unavail5031", variant="hqdefault")
    waits = []
    response, error, attempts = fetch.fetch_with_retries(url, CFG, limiter, sleep=waits.append)
    assert error is None and response.status == 200 and attempts == 2
    # The shared cool-down is the backoff this thread itself waits (no Retry-After to go by).
    assert limiter.cool_downs == waits and CFG.backoff_base / 2 <= waits[0] <= CFG.backoff_base


def test_per_process_share_never_exceeds_the_global_caps():
    cfg = PolitenessConfig(max_connections=16, requests_per_second=50)
    for processes in (1, 3, 5, 16):
        share = cfg.per_process(processes)
        assert 1 <= share.max_connections * processes <= 16
    # 32 processes of at least one connection each would put 32 requests in flight, not 16.
    with pytest.raises(ValueError, match="Lower --processes to 16 or raise --max-connections to 32"):
        cfg.per_process(32)
    with pytest.raises(ValueError, match="at least 1"):
        cfg.per_process(0)
