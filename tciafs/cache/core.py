"""The cache as the file system and the control file see it: holds, pins and commands,
over the parts that keep the files (docs/design/cache.md).

`Cache` builds the parts and answers callers; each part owns its own state:
- `Store` (store.py): the files on disk;
- `Index` (index.py): index.sqlite, the only SQL;
- `Contents` and `Holds` (contents.py): what is cached, in memory, and who holds it;
- `Space` (space.py): the bound, reservations and eviction;
- `Fetcher` (fetch.py): one file from the service, single flight, publishing;
- `Prefetcher` (prefetch.py): whole series in the background.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tciafs.catalog import listed_series
from tciafs.sources.base import Source

from .blocks import HEADER_IO, WHOLE_LIMIT, Blocks, parse_key
from .contents import Contents, Holds
from .fetch import Fetcher
from .index import Index
from .model import CacheStats, Entry
from .parallel import Connections
from .prefetch import Prefetcher
from .space import Space
from .store import Store

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("tciafs.cache")

SAVE_EVERY = 256  # opens between two saves of recency and hit counts


class Cache:
    def __init__(self, root: Path, max_bytes: int, client: Source | None = None, *,
                 prefetch: bool = True, series_parallel: int = 4,
                 hedge_delay: float = 0.5, attempts: int = 3,
                 connections: Connections | None = None,
                 still_starting: Callable[[], None] | None = None,
                 whole_limit: int = WHOLE_LIMIT) -> None:
        """`still_starting` is called now and then while a long start-up (rebuilding a
        lost index) goes on, to tell a service manager not to give up on it.
        `whole_limit`: objects of a source with byte ranges larger than this are only
        ever read in blocks (blocks.py)."""
        self.root = root
        self.client = client
        self.prefetch = prefetch
        self.hedge_delay = hedge_delay
        self.stats = CacheStats()
        self._still_starting = still_starting
        self.store = Store(root)
        self.index, rows = self._open_index()
        self.contents = Contents(self.index)
        self.holds = Holds()
        self.space = Space(root, max_bytes, self.contents, self.holds, self._drop)
        for directory in self.store.directories():
            self.space.measure_dir(directory)
        self.index.set_bound(max_bytes)
        counters = self.index.counters()
        self.stats.hits = int(counters.get("hits", 0))
        self.stats.misses = int(counters.get("misses", 0))
        self.fetcher = Fetcher(client, attempts, self.store, self.space, self.index,
                               self.contents, self.stats)
        self.prefetcher = Prefetcher(self.fetcher, self.index, self.contents, self.holds,
                                     self.stats, self._drop, series_parallel, connections)
        self._touched: dict[str, float] = {}  # files opened since the last save → when
        self._unsaved_opens = 0
        self._reconcile(rows)
        self.blocks = Blocks(self.store, self.space, self.index, self.contents, self.holds,
                             self.fetcher, self.stats, whole_limit=whole_limit,
                             start_series=self._series_read_in_order,
                             series_fetching=self.is_fetching)
        self.blocks.reconcile()
        self.fetcher.on_whole = self.blocks.whole_published
        self.contents.complete = self.index.complete_series()

    # -- start-up ------------------------------------------------------------------------

    def _open_index(self) -> tuple[Index, list[tuple]]:
        """The index and the files it lists. An index found damaged, or gone (or empty)
        while cached files remain, is made anew from the files' own headers: losing the
        index must not cost the bytes (the reconcile would delete every unlisted file)."""
        index, rows, lost = Index.open(self.root)
        if lost is not None and self.store.has_files():
            log.warning("cache index %s is %s: indexing the cached files again",
                        index.path, lost)
            started = time.monotonic()
            found = self.store.scan(self._reindex_progress)
            rows = index.rebuild(found, listed_series(self.root))
            log.warning("cache index %s was %s. %d cached files (%d bytes) indexed again "
                        "from their own headers in %.1f s; pins and the service's MD5 "
                        "confirmations were lost", index.path, lost, len(found),
                        sum(f.size for f in found), time.monotonic() - started)
        return index, rows

    def _reindex_progress(self, files: int) -> None:
        if self._still_starting is not None:
            self._still_starting()
        log.info("cache index: %d cached files indexed so far", files)

    def _reconcile(self, rows: list[tuple]) -> None:
        """Start from what is on disk: tmp/ emptied, files without a row deleted, rows
        without a (whole) file forgotten."""
        kept, gone = self.store.reconcile(rows)
        for sop, series, size, pinned in kept:
            self.contents.add(sop, series, size, pinned=bool(pinned))
            self.space.count(size)
        if gone:
            log.warning("cache: %d indexed files were missing or partial; forgotten", len(gone))
            self.index.forget_lost(gone)
        self.contents.sizes.update(self.index.known_sizes())

    # -- queries -------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return self.space.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self.space.max_bytes = value

    @property
    def used_bytes(self) -> int:
        return self.space.used_bytes

    def room_for_guesses(self) -> bool:
        return self.space.room_for_guesses()

    @property
    def entries(self) -> int:
        """Whole files cached (blocks share their LRU, but are not entries)."""
        return len(self.contents.files) - self.blocks.count

    @property
    def db(self) -> sqlite3.Connection:
        return self.index.db

    @property
    def attempts(self) -> int:
        return self.fetcher.attempts

    @property
    def in_flight(self) -> dict[str, list[int]]:
        return self.prefetcher.in_flight

    @property
    def failed_series(self) -> dict[str, str]:
        return self.prefetcher.failed

    @property
    def on_refused(self) -> Callable[[str], Awaitable[None]] | None:
        return self.prefetcher.on_refused

    @on_refused.setter
    def on_refused(self, callback: Callable[[str], Awaitable[None]] | None) -> None:
        self.prefetcher.on_refused = callback

    @property
    def instances_of(self) -> Callable[[str], Awaitable[list[str] | None]] | None:
        return self.prefetcher.instances_of

    @instances_of.setter
    def instances_of(self, callback: Callable[[str], Awaitable[list[str] | None]] | None
                     ) -> None:
        self.prefetcher.instances_of = callback

    def known_size(self, sop: str) -> int | None:
        return self.contents.sizes.get(sop)

    def open_count(self, sop: str) -> int:
        return self.holds.open[sop]

    def is_cached(self, sop: str) -> bool:
        return sop in self.contents.files

    def cached_count(self, series: str) -> int:
        return self.contents.series_files[series]

    def cached_bytes(self, series: str) -> int:
        return self.contents.series_bytes[series]

    def md5_of(self, sop: str) -> str | None:
        return self.index.md5(sop, verified=True)

    def series_collection(self, series: str) -> str | None:
        """The collection of a series the cache holds or has held, or None."""
        return self.index.collection_of(series)

    def is_fetching(self, series: str) -> bool:
        return series in self.prefetcher.tasks

    def failed_for_now(self, series: str) -> bool:
        return self.prefetcher.failed_for_now(series)

    def series_complete(self, series: str) -> bool:
        return series in self.contents.complete

    # -- reading -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background series fetches and headers fetched ahead; runs until
        cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.prefetcher.run)
            self.blocks.nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.blocks.nursery = None

    async def acquire(self, collection: str, series: str, sop: str,
                      series_bytes: int | None = None) -> Entry:
        """Make the instance's bytes available and hold them until release()."""
        # Held before the first await: eviction may not take the file once it comes
        # (docs/design/cache.md, "Concurrency").
        self.holds.take(sop, series)
        try:
            await self._ensure_present(collection, series, sop, series_bytes)
        except BaseException:
            self.holds.let_go(sop, series)
            raise
        self._touch(sop)
        return self._entry(sop, series)

    def acquire_blocks(self, collection: str, series: str, sop: str, size: int | None,
                       following: list[tuple[str, int | None]] | None = None
                       ) -> Entry | None:
        """Hold an instance not cached whole to read it by blocks (`read_blocks`), with no
        byte fetched yet; None when it is not read so: its source takes no byte ranges,
        or its size is not known before a read. It counts as a miss. `following`: the
        next files of its series (name, size), whose headers a header read fetches ahead."""
        if sop in self.contents.files or size is None or not self.blocks.takes(size):
            return None
        self.holds.take(sop, series)
        self.blocks.opened(collection, series, sop, size, following or [])
        self.stats.misses += 1
        return Entry(sop, series, size, self.store.file(sop), partial=True)

    def io_size(self, sop: str, size: int | None, usual: int) -> int:
        """The I/O size (st_blksize) to tell readers of an instance: a small one while it
        would be read by blocks, so that a header reader's first read asks the kernel for
        block 0 alone (blocks.py, FIRST); else `usual`."""
        if sop in self.contents.files or not self.blocks.takes(size):
            return usual
        return HEADER_IO

    async def read_blocks(self, entry: Entry, off: int, size: int) -> bytes:
        """Read from an entry of `acquire_blocks`."""
        return await self.blocks.read(entry, off, size)

    def hold(self, series: str, sop: str) -> Entry | None:
        """Hold a cached instance against eviction, without fetching or counting a hit."""
        if sop not in self.contents.files:
            return None
        self.holds.take(sop, series)
        return self._entry(sop, series)

    @staticmethod
    def harm(entry: Entry) -> str | None:
        """How the file of an entry was changed from outside the mount, if it was:
        "deleted" (a cleaner of old files in /tmp), "cut short" (a copy or restore of the
        cache dir that ran out of room) or "grown". A stat: cheap beside an open."""
        if entry.partial:
            return None  # its blocks are checked as they are read
        try:
            size = os.stat(entry.path).st_size
        except FileNotFoundError:
            return "deleted"
        if size == entry.size:
            return None
        return "cut short" if size < entry.size else "grown"

    async def fetch_lost(self, entry: Entry) -> Entry:
        """The file of a held entry was harmed from outside: forget it and fetch it
        again. The caller's hold carries over to the new file."""
        if entry.sop in self.contents.files and self.harm(entry):
            self._drop(entry.sop)
        collection = self.series_collection(entry.series) or ""
        # Not the whole series: only this file is lost.
        await self.fetcher.fetch_one(collection, entry.series, entry.sop)
        return self._entry(entry.sop, entry.series)

    def _entry(self, sop: str, series: str) -> Entry:
        return Entry(sop, series, self.contents.files[sop], self.store.file(sop))

    def release(self, entry: Entry) -> bool:
        """Let go of a hold; True when that dropped the file, as stale (drop_revised)."""
        self.holds.let_go(entry.sop, entry.series)
        if entry.partial and entry.sop not in self.holds.open:
            self.blocks.closed(entry.sop)
        if entry.sop in self.holds.open or entry.sop not in self.contents.stale:
            return False
        self.contents.stale.discard(entry.sop)
        if entry.sop in self.contents.files:
            self._drop(entry.sop)
        self.contents.forget([entry.sop])
        return True

    def _touch(self, sop: str) -> None:
        # The order and the hit counts live in memory; the index learns them in batches,
        # since a write per open would cost more than the open itself. A crash forgets
        # only recency and the last counts; `cache stats` of a running mount lags a little.
        self.contents.files.move_to_end(sop)
        self._touched[sop] = time.time()
        self._unsaved_opens += 1
        if self._unsaved_opens >= SAVE_EVERY:
            self.save_counters()

    async def _ensure_present(self, collection: str, series: str, sop: str,
                              series_bytes: int | None) -> None:
        if sop in self.contents.files:
            self.stats.hits += 1
            return
        self.stats.misses += 1
        streaming = self.is_fetching(series)
        if not streaming and self._wants_prefetch(series, series_bytes):
            # This open starts the stream: the file it waits for could be anywhere in
            # it, so fetch that one directly, alongside, at once.
            self.start_series_fetch(collection, series)
        elif streaming:
            await self.fetcher.published_soon(sop, self.hedge_delay)
        await self.fetcher.fetch_one(collection, series, sop)

    def _wants_prefetch(self, series: str, series_bytes: int | None) -> bool:
        if not self.prefetch or self.client is None or not self.prefetcher.running:
            return False
        if series_bytes is not None and series_bytes > self.max_bytes // 2:
            return False  # it would evict itself: read it instance by instance
        if series in self.failed_series:
            return False  # it failed once this mount: don't start it again at every open
        return not self.series_complete(series)

    def _series_read_in_order(self, collection: str, series: str) -> None:
        """A file of the series read by blocks is read in order: a copy, most likely."""
        if not self.is_fetching(series) and self._wants_prefetch(series, None):
            self.start_series_fetch(collection, series)

    def start_series_fetch(self, collection: str, series: str) -> trio.Event:
        """Fetch a whole series in the background (once); returns its completion event."""
        return self.prefetcher.start(collection, series)

    # -- commands ------------------------------------------------------------------------

    def pin_series(self, series: str, collection: str, pinned: bool = True) -> None:
        for sop in self.index.pin(series, collection, pinned):
            (self.contents.pinned.add if pinned else self.contents.pinned.discard)(sop)

    def discard(self, sops: list[str]) -> list[str]:
        """Drop files found damaged on disk, pinned ones too: no copy beats a bad one.
        Open ones stay, as their readers may hold their pages. Returns those dropped."""
        dropped = [sop for sop in sops
                   if sop in self.contents.files and not self.holds.open[sop]]
        for sop in dropped:
            self._drop(sop)
        return dropped

    def clear(self, series: str | None = None) -> int:
        """Drop cached bytes (of one series, or all) that nobody holds open and nobody
        pinned; return count."""
        return len(self._clear(series, keep_pinned=True))

    def drop_revised(self, series: str) -> tuple[list[str], bool]:
        """The service re-submitted the series, so its cached files may be stale: drop
        them, pinned ones too, but those held open. Returns the SOP UIDs dropped and
        whether the series is pinned (then it wants fetching again)."""
        pinned = self.index.series_pinned(series)
        self.fetcher.series_revised(series)
        self.contents.withdrawn.discard(series)  # back with new bytes, if it was withdrawn
        self.failed_series.pop(series, None)  # the new ones may well fetch
        evicted = self.index.files_of(series, present=False)
        dropped = self._clear(series, keep_pinned=False)
        self.contents.forget(dropped + evicted)  # sizes and MD5s of files evicted before too
        # Files held open keep their bytes for now; the last release drops them. The
        # index forgets them at once: should the daemon die first, the next start
        # deletes them as orphans instead of serving them.
        held = self.contents.held_in(series)
        self.contents.stale.update(held)
        self.index.mark_absent(held)
        return dropped, pinned

    def series_withdrawn(self, series: str) -> tuple[int, int, int]:
        """The archive no longer lists the series: its cached files, of no use unless it
        comes back, are the first to go when room is needed. Nothing is deleted now, so a
        listing that was wrong costs nothing. Files a fetch under way still brings go
        first too. Returns files, bytes and pinned files."""
        self.contents.withdrawn.add(series)
        sops = [sop for sop in self.index.files_of(series, present=True)
                if sop in self.contents.files]
        for sop in sops:
            self.contents.files.move_to_end(sop, last=False)
            self._touched.pop(sop, None)  # their recency, kept on disk, is the oldest too
        self.index.withdraw(series)
        return (len(sops), sum(self.contents.files[s] for s in sops),
                sum(s in self.contents.pinned for s in sops))

    def series_back(self, series: str) -> None:
        """Listed again as it was: files fetched from now on are used as any others."""
        self.contents.withdrawn.discard(series)

    def _clear(self, series: str | None, *, keep_pinned: bool) -> list[str]:
        victims = [s for s in self.contents.held_in(series)
                   if not self.holds.open[s] and not (keep_pinned and s in self.contents.pinned)]
        for sop in victims:
            self._drop(sop)
        self.contents.mark_incomplete(series)
        return victims

    def _drop(self, sop: str) -> None:
        """Take a cached file out: from memory, its room, its bytes, then its row. The
        file goes before the index is told: on a full disk, that frees the room the
        index's write needs; a crash in between leaves a row without its file, which
        the next start forgets. A block (blocks.py) goes the same way."""
        if parse_key(sop) is not None:
            self.blocks.drop(sop)
            self.stats.evictions += 1
            return
        self.space.release(self.contents.remove(sop))
        self.stats.evictions += 1
        self.store.remove(sop)
        self.index.mark_absent([sop])

    def _mark_complete(self, series: str, collection: str) -> None:
        self.contents.mark_complete(series, collection)

    # -- for tests that look inside ------------------------------------------------------

    @property
    def _lru(self) -> dict[str, int]:
        return self.contents.files

    @property
    def _series_tasks(self) -> dict[str, trio.Event]:
        return self.prefetcher.tasks

    @property
    def _series_limiter(self) -> trio.CapacityLimiter:
        return self.prefetcher.limiter

    # -- the end -------------------------------------------------------------------------

    def save_counters(self) -> None:
        touched = [(t, sop) for sop, t in self._touched.items()]
        counts = [("hits", str(self.stats.hits)), ("misses", str(self.stats.misses))]
        self._touched.clear()
        self._unsaved_opens = 0
        self.index.save_use(touched, counts)

    def close(self) -> None:
        self.save_counters()
        self.index.close()
