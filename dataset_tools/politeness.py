"""Single-host politeness: a connection cap, a requests-per-second token bucket, a shared
cool-down after 429/503, and exponential backoff with full jitter that honours Retry-After.

All thumbnails come from one host (i.ytimg.com), so these limits are per *process*; the build
divides the user's global caps by the number of processes (see ``PolitenessConfig.per_process``).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace

try:
    import fcntl
except ImportError:  # not POSIX: the file is written unlocked, as before the lock
    fcntl = None


@dataclass(frozen=True)
class PolitenessConfig:
    """Limits for talking to the thumbnail host."""

    max_connections: int = 16
    """Concurrent requests in flight (whole build)."""
    requests_per_second: float = 50.0
    """Request rate cap (whole build); 0 disables the cap."""
    retries: int = 3
    """Re-attempts of one URL after 429, 5xx, timeouts or dropped connections."""
    backoff_base: float = 0.5
    """First backoff in seconds; doubles per attempt, full jitter."""
    backoff_max: float = 60.0
    """Longest single wait (also caps an absurd Retry-After)."""
    deadline: float = 20.0
    """Wall-clock seconds for one HTTP request, connect to last byte."""
    max_bytes: int = 8 * 1024 * 1024
    """Largest response body accepted."""
    max_pixels: int = 4096 * 4096
    """Largest decoded image (width * height) accepted, checked from the header before decoding."""
    user_agent: str = (
        "vutrain-dataset-tools/0.1 (+https://github.com/vector-universe/vutrain; thumbnails for research)"
    )
    """Identifiable User-Agent sent with every request."""
    robots_token: str = "vutrain"
    """Token matched against ``X-Robots-Tag: <token>: noai`` directives."""
    disallowed_directives: tuple = ("noai", "noimageai", "noindex", "noimageindex")
    """X-Robots-Tag directives that make us drop an image (img2dataset's defaults)."""

    def per_process(self, processes: int) -> PolitenessConfig:
        """The share of the global caps one of ``processes`` workers may use.

        Raises ValueError (a one-line message saying what to change) when the caps cannot be
        shared: each process needs one connection, so more processes than ``max_connections``
        would put more requests in flight than the user allowed.
        """
        if processes < 1 or self.max_connections < 1:
            raise ValueError(
                f"--processes {processes} and --max-connections {self.max_connections}: both must be "
                "at least 1."
            )
        if processes > self.max_connections:
            raise ValueError(
                f"--processes {processes} is more than --max-connections {self.max_connections}: each "
                "process holds at least one connection, so the build would exceed the cap. Lower "
                f"--processes to {self.max_connections} or raise --max-connections to {processes}."
            )
        return replace(
            self,
            max_connections=self.max_connections // processes,
            requests_per_second=self.requests_per_second / processes,
        )


COOL_DOWN_FILE = "host_cooldown.json"
"""In the build's state folder (``_build/``): each host's cool-down and its wall-clock end."""

MAX_COOL_DOWN_HOSTS = 64
"""Most hosts ``host_cooldown.json`` keeps (those whose pause ends last): a build asks one host,
a few moves of ``--url-template`` a handful; the bound keeps an edited or odd file small."""

_ANY_HOST = "*"  # the key of a cool-down whose host is not known: it holds back every host


def template_host(url_template: str) -> str:
    """The host (``name[:port]``, lower case) a ``--url-template`` sends its requests to: the key
    of its cool-down, so that a resume against a moved template does not wait out the old host's."""
    return urllib.parse.urlsplit(url_template).netloc.lower()


class SharedCoolDown:
    """A cool-down kept in a file, so that it outlives the process that was told to wait.

    A 429/503 with ``Retry-After`` seen by one worker process held back only that process:
    the other processes, a worker img2dataset's pool started afresh (every 5 shards) and a build
    restarted after a kill all hit the host again at full rate. The file holds the wall-clock end
    of every host's pause (``{"hosts": {"i.ytimg.com": unix seconds, ...}, "until": ..., "host":
    ...}``, the last two naming the latest write, as builds before the map wrote and read them);
    every limiter of a ``host`` that shares it waits for that host's. Until 2026-12-07 the file
    held one host: a build that moved ``--url-template`` to another host, was throttled there and
    moved back within ``--backoff-max`` had lost the first host's pause and hit it again at once.
    Ended pauses are dropped when the file is written, and at most ``MAX_COOL_DOWN_HOSTS`` kept.
    Each write re-reads and replaces the file under an ``flock`` of ``host_cooldown.json.lock``:
    until 2026-12-07 two processes extending at once could each write the map they had read, and
    the later write dropped the other's new host or kept its shorter end.
    A file without a host (a build before the host was recorded, or ``host`` None here) holds
    back every host, for at most ``max_seconds``. A file that does not read, names no number or
    lies in the past means no wait; a wait longer than ``max_seconds`` (a clock set back) is cut
    to it. Writes that fail are skipped: politeness within the process still holds, and a build
    never stops for this file. ``host`` None waits for every host's cool-down.
    """

    def __init__(self, path: str, max_seconds: float, host: str | None = None):
        self.path = path
        self.max_seconds = float(max_seconds)
        self.host = host
        self._seen: tuple | None = None  # (inode, mtime_ns, size) of the file as last read
        self._until = 0.0  # wall-clock end, the latest read or written

    def remaining(self) -> float:
        """Seconds the host still wants us to wait, per the file (0 when none)."""
        self._refresh()
        return max(0.0, self._until - time.time())

    def extend(self, seconds: float) -> None:
        """Make the shared cool-down last at least ``seconds`` from now."""
        now = time.time()
        until = now + seconds
        self._refresh()
        if until <= self._until:
            return
        self._until = until
        # Read and write under the lock: two processes of a build extending at once each read
        # the file and wrote their own map, and the later write dropped the other's new pause.
        with _locked(self.path):
            # Read afresh, not from the last look: the other hosts' pauses in the file are kept.
            hosts = {h: end for h, end in _read_hosts(self.path).items() if end > now}
            key = _ANY_HOST if self.host is None else self.host
            hosts[key] = max(until, hosts.get(key, 0.0))
            kept = dict(sorted(hosts.items(), key=lambda item: item[1], reverse=True)[:MAX_COOL_DOWN_HOSTS])
            record = {"hosts": kept, "until": until} | ({} if self.host is None else {"host": self.host})
            _write_atomically(self.path, record)

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        # Cut when read, not when asked: a cut on every ask would renew the wait for as long as
        # the clock was set back.
        until = _until_for(_read_hosts(self.path), self.host)
        self._until = max(self._until, min(until, time.time() + self.max_seconds))


COOL_DOWN_LOCK_WAIT = 10.0
"""Longest wait, in seconds, for another process's hold of the cool-down file's lock (held for
one read and one write, milliseconds); past it the write goes ahead unlocked. A holder that never
lets go (stopped, or a child forked while a thread held it, which keeps the lock alive) must not
stop every download of the build."""


@contextlib.contextmanager
def _locked(path: str):
    """Hold an exclusive ``flock`` on ``PATH.lock`` (kept, never removed: removing it would let
    two writers lock two different files). A lock that cannot be taken (a read-only folder, a
    file system without locks, a holder past ``COOL_DOWN_LOCK_WAIT``) is done without, like a
    write that fails: a build never stops for this file."""
    fd = _lock_fd(f"{path}.lock")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _lock_fd(lock_path: str) -> int | None:
    """An open descriptor of ``lock_path`` with the exclusive lock taken, or None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    give_up = time.monotonic() + COOL_DOWN_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= give_up:
                break
            time.sleep(0.005)  # polled: a blocking flock cannot be given up on
        except OSError:
            break
    os.close(fd)
    return None


def _write_atomically(path: str, record: dict) -> None:
    """``record`` as JSON at ``path`` through a temporary name; an OSError leaves the file as it was."""
    tmp = f"{path}.{os.getpid()}-{random.getrandbits(48):012x}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def _until_for(hosts: dict[str, float], host: str | None) -> float:
    """The end of the pause ``host`` must wait for: its own or one of an unknown host (``host``
    None: any host's)."""
    if host is None:
        return max(hosts.values(), default=0.0)
    return max(hosts.get(host, 0.0), hosts.get(_ANY_HOST, 0.0))


def _read_hosts(path: str) -> dict[str, float]:
    """``{host: until}`` of a cool-down file (``_ANY_HOST`` for a pause of no known host); empty
    when it does not read as one (torn, edited, other). Reads the map, and the one-host form
    (``{"until": ..., "host": ...}``) builds before it wrote."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    hosts = record.get("hosts")
    if isinstance(hosts, dict):
        pairs = hosts.items()
    else:
        host = record.get("host")
        pairs = [(host if isinstance(host, str) else _ANY_HOST, record.get("until"))]
    return {str(host): float(until) for host, until in pairs if _is_time(until)}


def _is_time(value: object) -> bool:
    """A number of seconds as JSON gives one (not a boolean, not NaN)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


class HostLimiter:
    """Connection semaphore + token bucket + cool-down, shared by all threads of a process, and
    with ``shared`` (a ``SharedCoolDown``) the cool-down shared with other processes and builds."""

    def __init__(
        self, max_connections: int, requests_per_second: float, shared: SharedCoolDown | None = None
    ):
        self._slots = threading.BoundedSemaphore(max(1, max_connections))
        self._rate = float(requests_per_second)
        self._lock = threading.Lock()
        self._next_free = time.monotonic()  # earliest time the next request may start
        self._cooldown_until = 0.0
        self._shared = shared

    def acquire(self) -> None:
        """Block until a connection slot and a rate token are available."""
        self._slots.acquire()
        try:
            self._wait_turn()
        except BaseException:
            self._slots.release()
            raise

    def wait_turn(self) -> None:
        """Wait for a rate token (and any cool-down) for a request sent under a slot already held:
        the next hop of a redirect is one more request to the host."""
        self._wait_turn()

    def _wait_turn(self) -> None:
        """Sleep until neither the rate nor a cool-down holds this request back, then take the
        token. Checked again after every sleep: a 429 seen by another thread (or, through the
        shared file, another process) meanwhile moves the cool-down, and a request planned before
        it must wait for it too."""
        while True:
            with self._lock:
                now = time.monotonic()
                start = max(self._next_free, self._cooldown_until)
                if self._shared is not None:
                    start = max(start, now + self._shared.remaining())
                if now >= start:
                    if self._rate > 0:
                        self._next_free = now + 1.0 / self._rate
                    return
            time.sleep(start - now)

    def release(self) -> None:
        """Give back the connection slot taken by ``acquire``."""
        self._slots.release()

    def cool_down(self, seconds: float) -> None:
        """Hold every thread of this process (and the sharers of the file) back for ``seconds``
        (after a 429/503)."""
        with self._lock:
            self._cooldown_until = max(self._cooldown_until, time.monotonic() + seconds)
            if self._shared is not None:
                self._shared.extend(seconds)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        # str.isdigit also takes '²' or '³' (latin-1 header bytes): float() raised on them and the
        # row failed as an internal fetch error, without retries or the shared cool-down.
        return float(value) if value.isascii() else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        # HTTP dates are GMT, but the asctime form ("Sun Dec  6 10:00:30 2026", which HTTP
        # requires clients to read) and "-0000" parse without a zone, and .timestamp() took them
        # as local time: hours too long west of Greenwich, already past (no wait) east of it.
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(
    attempt: int, config: PolitenessConfig, retry_after: float | None = None, rng: random.Random = random
) -> float:
    """Wait before re-attempt ``attempt`` (0-based): full jitter on base*2**attempt, at least the
    server's Retry-After, never more than ``backoff_max``."""
    ceiling = min(config.backoff_max, config.backoff_base * (2**attempt))
    delay = rng.uniform(0.5 * ceiling, ceiling)  # half-jitter: spreads threads, keeps the growth
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, config.backoff_max)
