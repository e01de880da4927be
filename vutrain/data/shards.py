"""Shard specs: brace expansion, ``::``-joined sources, and the epoch sample count.

A spec such as ``/data/a/{00000..00009}.tar::/data/b/{000..003}.tar`` names shards of several
sources. Every local path a spec names must exist (``check_shards`` lists the missing ones;
``data.allow_missing_shards`` accepts them with a warning); ``pipe:`` commands and URLs
(``s3://``, ``https://``...) are kept as they are, the reader opens them with ``webdataset.gopen``.
"""

from __future__ import annotations

import json
import os
import re

import braceexpand

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


def is_remote(url: str) -> bool:
    """True for ``pipe:...`` specs and URLs with a scheme (not checked for existence)."""
    return bool(_REMOTE.match(url)) and not url.startswith("file://")


def check_openable(shards: list[str], key: str) -> list[str]:
    """``shards``, after checking that ``webdataset.gopen`` has a handler for every URL's scheme.

    gopen raises ValueError for a scheme it has none for (``s3://``, ``az://``...) only when a
    loader worker opens the shard: a worker traceback at the first batch, after start-up.
    GOPEN_REWRITE rules are applied first, as gopen does.

    Raises:
        ShardListError: naming the first such URL and how to read it instead.
    """
    remote = [url for url in shards if is_remote(url)]
    if not remote:
        return shards
    from urllib.parse import urlparse

    from webdataset.gopen import gopen_schemes, rewrite_url

    for url in remote:
        scheme = urlparse(rewrite_url(url)).scheme
        if scheme not in ("", "file") and scheme not in gopen_schemes:
            raise ShardListError(
                f"{key}: webdataset.gopen cannot open {scheme}:// URLs ({url}); read them through a "
                "pipe: command (for S3: 'pipe:aws s3 cp s3://bucket/x.tar -') or map them with GOPEN_REWRITE"
            )
    return shards


# A URL host in brackets (an IPv6 literal, ``http://[::1]:8000/``): its colons are no separator.
_SOURCE_PART = re.compile(r"://\[[^\]/]*\]|::|.", re.DOTALL)


def split_sources(spec: str) -> list[str]:
    """The sources of ``spec``: split at every ``::`` except inside a URL's bracketed IPv6 host.

    A plain ``split("::")`` broke ``http://[::1]:8000/{0..3}.tar`` into pieces reported as missing.
    """
    sources, current = [], []
    for match in _SOURCE_PART.finditer(spec):
        if match.group() == "::":
            sources.append("".join(current))
            current = []
        else:
            current.append(match.group())
    sources.append("".join(current))
    return sources


class ShardListError(ValueError):
    """A shard spec that names missing shards; the message is one line that says what to do."""


def _preview(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_shards(
    spec: str, key: str = "data.train_shards", allow_missing: bool = False
) -> tuple[list[str], list[str]]:
    """(existing shards in order, missing ones) of ``spec``, sources joined by ``::``.

    Every local shard a brace range names must exist; remote ones are not checked.

    Raises:
        ShardListError: when a source matches no shard at all, or when any named shard is missing
            and ``allow_missing`` is false (the message lists them and names the switch).
    """
    if not spec or not spec.strip():
        raise ShardListError(f"{key} is empty. Set it to a shard spec such as /data/{{00000..00009}}.tar.")
    shards: list[str] = []
    missing: list[str] = []
    for source in split_sources(spec):
        source = source.strip()
        found = []
        for url in braceexpand.braceexpand(source):
            if url.startswith("file://"):
                url = url[len("file://") :]
            if is_remote(url) or os.path.isfile(url):
                found.append(url)
            else:
                missing.append(url)
        if not found:
            raise ShardListError(f"{key} matched 0 files: {source}. Check the path or brace range.")
        shards.extend(found)
    if missing and not allow_missing:
        raise ShardListError(
            f"{key}: {len(missing)} of {len(shards) + len(missing)} shards do not exist: "
            f"{_preview(missing)}. "
            f"Fix the path or brace range, or set data.allow_missing_shards=true to use the "
            f"{len(shards)} that exist."
        )
    return shards, missing


def expand_shards(spec: str, key: str = "data.train_shards", allow_missing: bool = False) -> list[str]:
    """Expand ``spec`` to a list of shard URLs/paths, in order, sources joined by ``::``.

    Raises:
        ShardListError (a ValueError): when a source matches no shard ("data.train_shards matched
            0 files: ..."), or a named local shard is missing and ``allow_missing`` is false.
    """
    return check_shards(spec, key, allow_missing)[0]


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""Shards the reader opens (compressed ones through tarfile): what ``__len__`` counts."""


def _shard_stem(name: str) -> str:
    """``00000`` of ``00000.tar`` and of ``00000.tar.gz`` (img2dataset's stats file names the stem:
    cutting only the last suffix looked for ``00000.tar_stats.json`` beside compressed shards)."""
    suffix = next((s for s in _SHARD_SUFFIXES if name.endswith(s)), None)
    return name[: -len(suffix)] if suffix else name.rsplit(".", 1)[0]


def _count_in_dir(directory: str, names: list[str]) -> int | None:
    """Samples of the shards ``names`` (basenames) of one local directory, or None if unknown.

    Looks, in open_clip's order, at ``sizes.json`` then ``__len__`` (the whole directory: used
    only when ``names`` are every tar of the directory, each once), then at img2dataset's
    ``NNNNN_stats.json`` (``successes``) for each shard.
    """
    sizes_path = os.path.join(directory, "sizes.json")
    if os.path.isfile(sizes_path):
        with open(sizes_path) as f:
            sizes = json.load(f)
        if all(n in sizes for n in names):
            return sum(int(sizes[n]) for n in names)
    len_path = os.path.join(directory, "__len__")
    every_tar = {n for n in os.listdir(directory) if n.endswith(_SHARD_SUFFIXES)}
    # A subset of the directory (a brace range over part of it) would get the whole count: the
    # epoch would run that many times longer, repeating its samples. A list naming some shards
    # twice (a source upsampled with ``::``) would get it too, an epoch short of its repeats.
    if os.path.isfile(len_path) and sorted(names) == sorted(every_tar):
        with open(len_path) as f:
            return int(f.read().strip())
    total = 0
    for name in names:
        stats_path = os.path.join(directory, _shard_stem(name) + "_stats.json")
        if not os.path.isfile(stats_path):
            return None
        with open(stats_path) as f:
            total += int(json.load(f)["successes"])
    return total


def count_samples(shards: list[str]) -> int | None:
    """Total samples of local ``shards`` from their directories' size files; None if any is unknown."""
    by_dir: dict[str, list[str]] = {}
    for url in shards:
        if is_remote(url):
            return None
        by_dir.setdefault(os.path.dirname(os.path.abspath(url)), []).append(os.path.basename(url))
    total = 0
    for directory, names in by_dir.items():
        n = _count_in_dir(directory, names)
        if n is None:
            return None
        total += n
    return total
