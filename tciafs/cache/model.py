"""The names every part of the cache shares: its errors, an entry held open, the counters."""

from __future__ import annotations

from dataclasses import dataclass


class CacheFull(Exception):
    """Nothing more can be evicted to make room."""


class CacheDiskError(Exception):
    """The cache's own disk refused a write (read-only, an I/O error, no permission):
    files not cached yet cannot be read until it is mended; cached ones still can."""


class FetchFailed(Exception):
    """The bytes could not be fetched or did not check out."""


class BadCopy(FetchFailed):
    """The bytes came whole but are not the source's: another instance than asked for, a
    size or MD5 that disagrees, a series ZIP that lacks files. A copy kept by a shared
    site cache may be what is wrong, so the next attempt asks past it (`fresh`)."""


class IntegrityError(FetchFailed):
    """Files of a series disagree with the service's own MD5 list, even fetched again one
    by one: fetching the whole series again won't help."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached file held by a reader: its bytes stay until the hold is released."""

    sop: str
    series: str
    size: int
    path: str
    # Read by blocks (Cache.read_blocks): `path` holds the bytes only once the object
    # became whole; until then they are in block files (cache/blocks.py).
    partial: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    single_fetches: int = 0
    series_fetches: int = 0
    series_resumed: int = 0  # series completed by fetching only their missing files
    series_cut_short: int = 0  # series finished file by file: no attempt brought the ZIP
    evictions: int = 0
    md5_mismatches: int = 0
