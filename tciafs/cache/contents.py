"""What the cache holds, and what holds it, in memory.

`Contents` mirrors the index's present files, per series, so that opens, status and
eviction never wait for SQLite; it writes through to the index where the index must
outlive the daemon (a series held whole, a file gone). `Holds` counts who needs a file
now: readers that hold it open, fetches that read its series.

Neither awaits: each change is whole between two checkpoints of trio
(docs/design/cache.md, "Concurrency").
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from .index import Index


class Contents:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.files: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
        self.series_of: dict[str, str] = {}
        # Per series: status reads them for every series of a job, each time.
        self.series_files: collections.Counter[str] = collections.Counter()
        self.series_bytes: collections.Counter[str] = collections.Counter()
        self.sizes: dict[str, int] = {}  # every file ever fetched, evicted ones too
        self.pinned: set[str] = set()
        self.stale: set[str] = set()  # files held open of a re-submitted series
        self.withdrawn: set[str] = set()  # series the archive stopped listing, this run
        self.complete: set[str] = set()  # series holding every file they list
        self.on_added: Callable[[str, str], None] | None = None  # (sop, series): a size known

    def add(self, sop: str, series: str, size: int, *, pinned: bool,
            oldest: bool = False) -> None:
        """A file is present: the most recently used one, or with `oldest` the next to go."""
        self.files[sop] = size
        if oldest:
            self.files.move_to_end(sop, last=False)
        self.series_of[sop] = series
        self.series_files[series] += 1
        self.series_bytes[series] += size
        self.sizes[sop] = size
        if pinned:
            self.pinned.add(sop)
        if self.on_added is not None:
            self.on_added(sop, series)

    def remove(self, sop: str) -> int:
        """A file goes: its series is no longer whole. Returns its size. The index still
        lists the file as present: the caller tells it once the file is deleted."""
        size = self.files.pop(sop)
        self.pinned.discard(sop)
        series = self.series_of.pop(sop, None)
        if series is not None:
            self.series_files[series] -= 1
            self.series_bytes[series] -= size
            self.mark_incomplete(series)
        return size

    def held_in(self, series: str | None) -> list[str]:
        """The present files of a series (of every series: None), least recently used first."""
        return [sop for sop in self.files
                if series is None or self.series_of.get(sop) == series]

    def forget(self, sops: list[str]) -> None:
        """Forget all about files dropped as stale: the new ones may differ in size too."""
        for sop in sops:
            self.sizes.pop(sop, None)
        self.index.delete(sops)

    def mark_complete(self, series: str, collection: str) -> None:
        self.index.mark_complete(series, collection)
        self.complete.add(series)

    def mark_incomplete(self, series: str | None) -> None:
        """One series, or all of them (None), no longer hold every file."""
        self.index.mark_incomplete(series)
        if series is None:
            self.complete.clear()
        else:
            self.complete.discard(series)


class Holds:
    """Who needs a file now. A held file is never evicted; one of a busy series only
    when nothing else is left."""

    def __init__(self) -> None:
        self.open: collections.Counter[str] = collections.Counter()
        self.busy: collections.Counter[str] = collections.Counter()  # series
        self.on_free: Callable[[], None] | None = None  # a file no longer held: evictable

    def take(self, sop: str, series: str) -> None:
        self.open[sop] += 1
        self.take_series(series)

    def let_go(self, sop: str, series: str) -> None:
        self.open[sop] -= 1
        if self.open[sop] <= 0:
            del self.open[sop]
            self._freed()
        self.let_go_series(series)

    def take_keys(self, keys: list[str]) -> None:
        """Hold blocks (blocks.py) while a read or a join uses them."""
        self.open.update(keys)

    def let_go_keys(self, keys: list[str]) -> None:
        for key in keys:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]
                self._freed()

    def _freed(self) -> None:
        if self.on_free is not None:
            self.on_free()

    def take_series(self, series: str) -> None:
        self.busy[series] += 1

    def let_go_series(self, series: str) -> None:
        self.busy[series] -= 1
        if self.busy[series] <= 0:
            del self.busy[series]
