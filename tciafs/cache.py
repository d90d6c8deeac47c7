"""Instance bytes on disk: a bounded, persistent, crash-safe cache.

Invariants (the tests check each one):
- Bound: the bytes of cached files, of downloads in progress and of the SQLite files
  under the cache directory never exceed `max_bytes`. Space is reserved before each
  chunk is written, and eviction happens right there, never by polling.
- Eviction: least recently used whole instances. Never an open instance, never a
  pinned one. Instances of series that are being fetched or read go last, only when
  nothing else is left (so a series larger than the cache still reads, one instance
  at a time). Room reserved ahead by downloads is taken back before giving up; when
  nothing can go, the read fails with CacheFull.
- Visibility: a file enters the index only after its bytes are complete, checked
  (Content-Length, or the ZIP entry's CRC-32, plus a DICOM header naming the
  expected SOPInstanceUID), fsynced and renamed into place. The MD5 list of a
  series fetch then confirms it; a mismatch removes the file.
- Crash: downloads live in tmp/ until renamed. At start tmp/ is emptied, files
  without an index row are deleted and rows without a (whole) file are forgotten.
- Sizes: the exact size of every instance ever fetched stays in the index, even
  after its bytes are evicted, so listings keep reporting exact sizes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import random
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio
from pydicom.filereader import read_partial
from pydicom.tag import Tag

from tciafs.catalog import Kind, is_damaged, open_db, set_aside, stored_rows, transaction
from tciafs.sources.base import (
    AuthError,
    ChecksumMismatch,
    ClientError,
    MalformedResponse,
    NotFound,
    ServerError,
    Source,
    TruncatedStream,
)

log = logging.getLogger(__name__)

META_SLACK = 1 << 20  # the WAL checkpoints at 100 pages; the index grows in small steps

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances(
    sop TEXT PRIMARY KEY,
    series TEXT NOT NULL,
    collection TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    present INTEGER NOT NULL DEFAULT 1,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series);
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series(
    uid TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    fetched REAL);
"""


class CacheFull(Exception):
    """Nothing more can be evicted to make room."""


class CacheDiskError(Exception):
    """The cache's own disk refused a write (read-only, an I/O error, no permission):
    files not cached yet cannot be read until it is mended; cached ones still can."""


class FetchFailed(Exception):
    """The bytes could not be fetched or did not check out."""


class IntegrityError(FetchFailed):
    """Files of a series disagree with the service's own MD5 list, even fetched again one
    by one: fetching the whole series again won't help."""


@dataclass(frozen=True, slots=True)
class Entry:
    sop: str
    series: str
    size: int
    path: str


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


class Cache:
    def __init__(self, root: Path, max_bytes: int, client: Source | None = None, *,
                 prefetch: bool = True, series_parallel: int = 4,
                 hedge_delay: float = 0.5, attempts: int = 3,
                 still_starting: Callable[[], None] | None = None) -> None:
        """`still_starting` is called now and then while a long start-up (rebuilding a
        lost index) goes on, to tell a service manager not to give up on it."""
        self.root = root
        self._still_starting = still_starting
        self.max_bytes = max_bytes
        self.client = client
        self.prefetch = prefetch
        self.hedge_delay = hedge_delay
        self.attempts = attempts
        self.stats = CacheStats()
        # Told of each file whose bytes the service's MD5 list refused, once removed here:
        # copies of them elsewhere (the kernel's page cache) must go too.
        self.on_refused: Callable[[str], Awaitable[None]] | None = None
        # The SOP Instance UIDs a series lists, or None when it is not known: a series
        # already partly cached then fetches only the files it lacks.
        self.instances_of: Callable[[str], Awaitable[list[str] | None]] | None = None
        for sub in ("objects", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._objects = str(root / "objects")
        self._dir_bytes: dict[str, int] = {}
        for directory in (root, root / "objects", root / "tmp",
                          *(root / "objects").iterdir()):
            self._measure_dir(directory)
        os.chmod(root, 0o700)
        self.db, indexed = self._open_index(root / "index.sqlite")
        self.db.execute("INSERT OR REPLACE INTO settings VALUES ('bound', ?)", (str(max_bytes),))
        counters = dict(self.db.execute("SELECT key, value FROM settings"))
        self.stats.hits = int(counters.get("hits", 0))
        self.stats.misses = int(counters.get("misses", 0))
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._series_of: dict[str, str] = {}
        self._pinned: set[str] = set()
        self._stale: set[str] = set()  # open files of a re-submitted series
        self._sizes: dict[str, int] = {}
        self._file_bytes = 0  # cached files plus reservations of downloads in progress
        self._open: collections.Counter[str] = collections.Counter()
        self._busy_series: collections.Counter[str] = collections.Counter()
        self._fetching: dict[str, trio.Event] = {}
        self._tmpfiles: set[_TmpFile] = set()  # downloads in progress
        self._touched: dict[str, float] = {}
        self._unsaved_opens = 0
        self._published: dict[str, trio.Event] = {}
        self._series_tasks: dict[str, trio.Event] = {}
        self._series_limiter = trio.CapacityLimiter(series_parallel)
        self._nursery: trio.Nursery | None = None
        self.in_flight: dict[str, list[int]] = {}  # series → [bytes so far, instances so far]
        self.failed_series: dict[str, str] = {}  # series → why its last fetch failed
        self._may_pass: set[str] = set()  # ... when the service or the network was at fault
        # The MD5s the service listed for files whose bytes disagreed, by series: a file
        # fetched again is checked against them, and served only if it matches.
        self._service_md5: dict[str, dict[str, str]] = {}
        # Counts each series' re-submissions seen: a download that began before the last
        # one may carry the old bytes, and is not published.
        self._revision: collections.Counter[str] = collections.Counter()
        self._withdrawn: set[str] = set()  # series the archive stopped listing, this run
        # Per series, in memory: status reads them for every series of a job, each time.
        self._series_files: collections.Counter[str] = collections.Counter()
        self._series_bytes: collections.Counter[str] = collections.Counter()
        self._reconcile(indexed)
        self._complete = {uid for uid, in self.db.execute(
            "SELECT uid FROM series WHERE complete=1")}

    # -- start-up ------------------------------------------------------------------------

    def _open_index(self, path: Path) -> tuple[sqlite3.Connection, list[tuple]]:
        """The index and the files it lists. An index found damaged, or gone (or empty)
        while cached files remain, is made anew from the files' own headers: losing the
        index must not cost the bytes (the reconcile would delete every unlisted file)."""
        lost = None
        try:
            db, rows = _open_index_db(path)
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            lost = f"damaged ({exc}); set aside as {set_aside(path)}"
            db, rows = _open_index_db(path)
        if lost is None and db.execute("SELECT 1 FROM instances LIMIT 1").fetchone() is None:
            lost = "missing or empty"  # deleted, or a rebuild was cut short
        if lost is not None and next((self.root / "objects").glob("*/*"), None):
            self._rebuild(db, path, lost)
            rows = _indexed(db)
        return db, rows

    def _rebuild(self, db: sqlite3.Connection, path: Path, lost: str) -> None:
        log.warning("cache index %s is %s: indexing the cached files again", path, lost)
        started = time.monotonic()
        files, nbytes = _reindex(db, self.root, self._reindex_progress)
        log.warning("cache index %s was %s. %d cached files (%d bytes) indexed again from "
                    "their own headers in %.1f s; pins and the service's MD5 confirmations "
                    "were lost", path, lost, files, nbytes, time.monotonic() - started)

    def _reindex_progress(self, files: int) -> None:
        if self._still_starting is not None:
            self._still_starting()
        log.info("cache index: %d cached files indexed so far", files)

    def _reconcile(self, rows: list[tuple]) -> None:
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(mode=0o700)
        on_disk = {p.name: p for p in (self.root / "objects").glob("*/*")}
        gone = []
        for sop, series, size, pinned in rows:
            path = on_disk.pop(_object_name(sop), None)
            if path is None or path.stat().st_size != size:
                gone.append(sop)
                if path is not None:
                    path.unlink()
                continue
            self._add_present(sop, series, size, bool(pinned))
        for orphan in on_disk.values():
            orphan.unlink()
        if gone:
            log.warning("cache: %d indexed files were missing or partial; forgotten", len(gone))
            self.db.executemany("UPDATE instances SET present=0 WHERE sop=?",
                                [(s,) for s in gone])
            self.db.execute("UPDATE series SET complete=0 WHERE uid IN (SELECT series FROM "
                            "instances WHERE present=0)")
        for sop, size in self.db.execute("SELECT sop, size FROM instances"):
            self._sizes[sop] = size

    def _add_present(self, sop: str, series: str, size: int, pinned: bool) -> None:
        self._lru[sop] = size
        self._series_of[sop] = series
        self._series_files[series] += 1
        self._series_bytes[series] += size
        self._file_bytes += size
        if pinned:
            self._pinned.add(sop)

    # -- accounting ----------------------------------------------------------------------

    def _meta_bytes(self) -> int:
        total = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if ".sqlite" in entry.name:
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def room_for_guesses(self) -> bool:
        """Whether listings fetched on a guess may still grow the metadata, which counts
        against the bound and is never evicted: while it takes under a quarter of it."""
        return self._meta_bytes() < self.max_bytes // 4

    @property
    def used_bytes(self) -> int:
        return self._file_bytes + self._meta_bytes() + sum(self._dir_bytes.values())

    def _measure_dir(self, path: Path) -> None:
        # Directories take room too (`du` counts them); they grow as files are added.
        with contextlib.suppress(FileNotFoundError):
            self._dir_bytes[str(path)] = path.stat().st_size

    @property
    def entries(self) -> int:
        return len(self._lru)

    def _reserve(self, nbytes: int, series: str) -> None:
        """Claim room for `nbytes` more, evicting as needed; raise CacheFull if impossible."""
        # META_SLACK keeps room for the SQLite files to grow until the next checkpoint.
        need = self.used_bytes + nbytes + META_SLACK - self.max_bytes
        if need > 0:
            self._evict(need, series)
        self._file_bytes += nbytes

    def _unreserve(self, nbytes: int) -> None:
        self._file_bytes -= nbytes

    def _evict(self, need: int, series: str) -> None:
        for allow_busy in (False, True):
            for sop in list(self._lru):
                if need <= 0:
                    return
                if not self._evictable(sop, allow_busy):
                    continue
                need -= self._lru[sop]
                self._drop(sop)
        if need > 0:
            need -= self._reclaim_ahead()
        if need > 0:
            raise CacheFull(f"cache full: {self.max_bytes} bytes bound, nothing evictable "
                            f"(open or pinned files hold it) while reading series {series}")

    def _reclaim_ahead(self) -> int:
        """Take back the room downloads reserved ahead of their bytes; return how much."""
        freed = 0
        for tmp in self._tmpfiles:
            freed += tmp.reserved - tmp.size
            tmp.settle()
        return freed

    def _evictable(self, sop: str, allow_busy: bool) -> bool:
        if self._open[sop] or sop in self._pinned:
            return False
        return allow_busy or not self._busy_series[self._series_of.get(sop, "")]

    def _drop(self, sop: str) -> None:
        size = self._lru.pop(sop)
        self._pinned.discard(sop)
        series = self._series_of.pop(sop, None)
        if series is not None:
            self._series_files[series] -= 1
            self._series_bytes[series] -= size
            self._mark_incomplete(series)
        self._file_bytes -= size
        self.stats.evictions += 1
        self._object_path(sop).unlink(missing_ok=True)
        self.db.execute("UPDATE instances SET present=0 WHERE sop=?", (sop,))

    # -- queries -------------------------------------------------------------------------

    def known_size(self, sop: str) -> int | None:
        return self._sizes.get(sop)

    def open_count(self, sop: str) -> int:
        return self._open[sop]

    def is_cached(self, sop: str) -> bool:
        return sop in self._lru

    def cached_count(self, series: str) -> int:
        return self._series_files[series]

    def cached_bytes(self, series: str) -> int:
        return self._series_bytes[series]

    def md5_of(self, sop: str) -> str | None:
        row = self.db.execute("SELECT md5 FROM instances WHERE sop=? AND verified=1",
                              (sop,)).fetchone()
        return row[0] if row else None

    def series_collection(self, series: str) -> str | None:
        """The collection of a series the cache holds or has held, or None."""
        row = self.db.execute("SELECT collection FROM series WHERE uid=? UNION ALL "
                              "SELECT collection FROM instances WHERE series=? LIMIT 1",
                              (series, series)).fetchone()
        return row[0] if row else None

    def is_fetching(self, series: str) -> bool:
        return series in self._series_tasks

    def failed_for_now(self, series: str) -> bool:
        """The series' last fetch failed for a reason that may pass (the service down,
        the network gone, a body cut short): worth trying again later."""
        return series in self.failed_series and series in self._may_pass

    def series_complete(self, series: str) -> bool:
        return series in self._complete

    def _object_path(self, sop: str) -> Path:
        return object_path(self.root, sop)

    def _object_file(self, sop: str) -> str:
        # A plain string: building Path objects cost a quarter of a warm open.
        name = _object_name(sop)
        return f"{self._objects}/{name[:2]}/{name}"

    # -- reading -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background series fetches; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def acquire(self, collection: str, series: str, sop: str,
                      series_bytes: int | None = None) -> Entry:
        """Make the instance's bytes available and hold them until release()."""
        self._hold_counts(sop, series)
        try:
            await self._ensure_present(collection, series, sop, series_bytes)
        except BaseException:
            self._release_counts(sop, series)
            raise
        self._touch(sop)
        return self._entry(sop, series)

    def hold(self, series: str, sop: str) -> Entry | None:
        """Hold a cached instance against eviction, without fetching or counting a hit."""
        if sop not in self._lru:
            return None
        self._hold_counts(sop, series)
        return self._entry(sop, series)

    @staticmethod
    def harm(entry: Entry) -> str | None:
        """How the file of an entry was changed from outside the mount, if it was:
        "deleted" (a cleaner of old files in /tmp), "cut short" (a copy or restore of the
        cache dir that ran out of room) or "grown". A stat: cheap beside an open."""
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
        if entry.sop in self._lru and self.harm(entry):
            self._drop(entry.sop)
        collection = self.series_collection(entry.series) or ""
        await self._fetch_one(collection, entry.series, entry.sop)  # not the whole series
        return self._entry(entry.sop, entry.series)

    def _entry(self, sop: str, series: str) -> Entry:
        return Entry(sop, series, self._lru[sop], self._object_file(sop))

    def _hold_counts(self, sop: str, series: str) -> None:
        self._open[sop] += 1
        self._busy_series[series] += 1

    def release(self, entry: Entry) -> bool:
        """Let go of a hold; True when that dropped the file, as stale (drop_revised)."""
        self._release_counts(entry.sop, entry.series)
        if entry.sop in self._open or entry.sop not in self._stale:
            return False
        self._stale.discard(entry.sop)
        if entry.sop in self._lru:
            self._drop(entry.sop)
        self._forget_revised([entry.sop])
        return True

    def _release_counts(self, sop: str, series: str) -> None:
        self._open[sop] -= 1
        if self._open[sop] <= 0:
            del self._open[sop]
        self._busy_series[series] -= 1
        if self._busy_series[series] <= 0:
            del self._busy_series[series]

    def _touch(self, sop: str) -> None:
        # The order and the hit counts live in memory; the index learns them in batches,
        # since a write per open would cost more than the open itself. A crash forgets
        # only recency and the last counts; `cache stats` of a running mount lags a little.
        self._lru.move_to_end(sop)
        self._touched[sop] = time.time()
        self._unsaved_opens += 1
        if self._unsaved_opens >= 256:
            self.save_counters()

    async def _ensure_present(self, collection: str, series: str, sop: str,
                              series_bytes: int | None) -> None:
        if sop in self._lru:
            self.stats.hits += 1
            return
        self.stats.misses += 1
        streaming = series in self._series_tasks
        if not streaming and self._wants_prefetch(series, series_bytes):
            # This open starts the stream: the file it waits for could be anywhere in
            # it, so fetch that one directly, alongside, at once.
            self.start_series_fetch(collection, series)
        elif streaming:
            with trio.move_on_after(self.hedge_delay):
                await self._published_event(sop).wait()
        await self._fetch_one(collection, series, sop)

    async def _fetch_one(self, collection: str, series: str, sop: str) -> None:
        """Fetch the instance alone, unless a fetch of it is under way: then wait for
        that one (and try again should it fail)."""
        while sop not in self._lru:
            pending = self._fetching.get(sop)
            if pending is not None:
                await pending.wait()
                continue
            await self._fetch_single(collection, series, sop)

    def _wants_prefetch(self, series: str, series_bytes: int | None) -> bool:
        if not self.prefetch or self.client is None or self._nursery is None:
            return False
        if series_bytes is not None and series_bytes > self.max_bytes // 2:
            return False  # it would evict itself: read it instance by instance
        if series in self.failed_series:
            return False  # it failed once this mount: don't start it again at every open
        return not self.series_complete(series)

    def _published_event(self, sop: str) -> trio.Event:
        event = self._published.get(sop)
        if event is None:
            event = self._published[sop] = trio.Event()
        return event

    async def _fetch_single(self, collection: str, series: str, sop: str) -> None:
        assert self.client is not None
        done = self._fetching[sop] = trio.Event()
        try:
            await self._with_attempts(f"instance {sop}", self._download_single,
                                      collection, series, sop)
        finally:
            del self._fetching[sop]
            done.set()

    async def _with_attempts(self, what: str, func, *args) -> None:  # noqa: ANN001
        for attempt in range(1, self.attempts + 1):
            try:
                await func(*args)
                return
            except (CacheFull, IntegrityError):
                raise
            except NotFound as exc:
                # It was listed, so "unknown" here means the service is failing (NBIA
                # answers both with the same 500): an I/O error, not a missing file.
                raise FetchFailed(f"{what}: the service no longer serves it: {exc}") from exc
            except (TruncatedStream, ChecksumMismatch) as exc:
                # The client retries only until the first byte: a body cut short or
                # damaged on the way is fetched again here.
                if attempt == self.attempts:
                    raise FetchFailed(f"{what}: {exc}") from exc
                log.info("retrying %s after: %s", what, exc)
                await trio.sleep(min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0))
            except ClientError as exc:
                # The client already retried with back-off: failing again here would
                # only multiply the wait before the reader gets its EIO.
                raise FetchFailed(f"{what}: {exc}") from exc
            except FetchFailed as exc:
                if attempt == self.attempts:
                    raise FetchFailed(f"{what}: {exc}") from exc
                log.info("retrying %s after: %s", what, exc)
                await trio.sleep(min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0))

    async def _download_single(self, collection: str, series: str, sop: str) -> None:
        assert self.client is not None
        revision = self._revision[series]
        async with (self.client.open_instance(collection, series, sop) as stream,
                    self._tmpfile(series, expected=stream.size) as tmp):
            async for chunk in stream.chunks():
                await tmp.write(chunk)
            if stream.size is not None and tmp.size != stream.size:
                raise FetchFailed(f"got {tmp.size} of {stream.size} bytes")
            await self._publish(tmp, collection, series, revision, expect_sop=sop,
                                expect_md5=self._listed_md5(series, sop))
        self.stats.single_fetches += 1

    def _listed_md5(self, series: str, sop: str) -> str | None:
        """The MD5 the service listed for an instance, if any list named it: the one of
        a fetch under way, else the one that confirmed an earlier copy, since evicted or
        lost (a re-submission forgets those). A single image comes without one."""
        listed = self._service_md5.get(series, {}).get(sop)
        if listed is None:
            row = self.db.execute("SELECT md5 FROM instances WHERE sop=? AND verified=1",
                                  (sop,)).fetchone()
            listed = row[0] if row else None
        return listed

    @asynccontextmanager
    async def _tmpfile(self, series: str, expected: int | None = None
                       ) -> AsyncIterator[_TmpFile]:
        tmp = _TmpFile(self, series, expected)
        self._tmpfiles.add(tmp)
        try:
            yield tmp
        finally:
            self._tmpfiles.discard(tmp)
            tmp.discard()

    async def _publish(self, tmp: _TmpFile, collection: str, series: str, revision: int, *,
                       expect_sop: str | None = None, expect_md5: str | None = None
                       ) -> tuple[str, str]:
        """Check, fsync and rename a finished download into place; return its SOP UID
        and the MD5 of its bytes as stored. With expect_md5, only those bytes will do,
        and the file is indexed as verified. `revision`: the series' when the download
        began."""
        with _cache_disk(self.root):
            sop, md5 = await trio.to_thread.run_sync(_finish_file, tmp.fd, tmp.path,
                                                     self.root)
        tmp.close()
        self._check_revision(series, revision)
        final = self._object_path(sop)
        if str(final.parent) not in self._dir_bytes:  # the thread may have just made it
            self._measure_dir(final.parent)
        if expect_sop is not None and sop != expect_sop:
            raise FetchFailed(f"server sent instance {sop!r} when asked for {expect_sop!r}")
        if expect_md5 is not None and md5 != expect_md5:
            self.stats.md5_mismatches += 1
            raise FetchFailed(f"instance {sop}: MD5 {md5} again, the service lists "
                              f"{expect_md5}")
        if sop in self._lru:  # another path delivered it first
            return sop, md5
        tmp.settle()
        with _cache_disk(self.root):  # full: the directory could not grow
            os.rename(tmp.path, final)
        # The file goes in before its row: a crash in between leaves an orphan, which
        # the next start deletes, never a row without its file.
        try:
            self._index(sop, series, collection, tmp.size, md5, verified=expect_md5 is not None)
        except BaseException:
            final.unlink(missing_ok=True)  # not served without its row
            raise
        self._measure_dir(final.parent)
        tmp.adopted()
        self._series_of[sop] = series
        self._series_files[series] += 1
        self._series_bytes[series] += tmp.size
        self._lru[sop] = tmp.size
        if series in self._withdrawn:  # a fetch still under way brought it
            self._lru.move_to_end(sop, last=False)
        self._sizes[sop] = tmp.size
        if self.db.execute("SELECT pinned FROM instances WHERE sop=?", (sop,)).fetchone()[0]:
            self._pinned.add(sop)
        if expect_md5 is not None:
            self._service_md5.get(series, {}).pop(sop, None)
        self.stats.bytes_fetched += tmp.size
        event = self._published.pop(sop, None)
        if event is not None:
            event.set()
        return sop, md5

    def _check_revision(self, series: str, revision: int) -> None:
        """Refuse what a download begun before the series' last re-submission brought."""
        if self._revision[series] != revision:
            raise FetchFailed(f"series {series} was re-submitted during the download")

    def _index(self, sop: str, series: str, collection: str, size: int, md5: str, *,
               verified: bool = False) -> None:
        """Record a file as present; when the disk is too full for the index to grow,
        make room once and try again."""
        for attempt in range(2):
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO instances(sop, series, collection, size, md5, "
                    "verified, present, last_access, pinned) VALUES (?, ?, ?, ?, ?, ?, 1, ?, "
                    "(SELECT pinned FROM series WHERE uid=?))",
                    (sop, series, collection, size, md5, int(verified),
                     0.0 if series in self._withdrawn else time.time(), series))
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF in _DB_DISK_ERRORS:
                    raise CacheDiskError(f"cache index in {self.root}: {exc}") from exc
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                full = f"disk full ({self.root}): the cache index cannot grow"
                if attempt:
                    raise CacheFull(full) from exc
                try:
                    self._evict(1, series)  # one file frees more than a row needs
                except CacheFull:
                    raise CacheFull(f"{full}; every cached file is open or pinned") from exc

    # -- series prefetch -----------------------------------------------------------------

    def start_series_fetch(self, collection: str, series: str) -> trio.Event:
        """Fetch a whole series in the background (once); returns its completion event."""
        event = self._series_tasks.get(series)
        if event is None and self._nursery is None:
            raise FetchFailed("the cache's background task is not running")
        if event is None:
            event = self._series_tasks[series] = trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._series_task, collection, series, event)
        return event

    async def _series_task(self, collection: str, series: str, done: trio.Event) -> None:
        self._busy_series[series] += 1
        try:
            async with self._series_limiter:
                listed = await self._resumable(series)
                cut_short = False
                if listed is None:
                    listed = await self._download_whole(collection, series)
                    cut_short = listed is not None
                if listed is not None:
                    await self._download_missing(collection, series, listed)
                    self.stats.series_cut_short += cut_short
            self.failed_series.pop(series, None)
            self._may_pass.discard(series)
        except (ClientError, FetchFailed, CacheFull, CacheDiskError) as exc:
            log.error("series fetch failed: %s", exc)
            self.failed_series[series] = str(exc)
            (self._may_pass.add if _may_pass(exc) else self._may_pass.discard)(series)
        except Exception as exc:
            # A disk or database fault in a background fetch must not end the mount:
            # the readers fetch what they need one by one.
            log.error("series fetch of %s failed: %s: %s", series, type(exc).__name__, exc)
            self.failed_series[series] = f"{type(exc).__name__}: {exc}"
        finally:
            self._busy_series[series] -= 1
            if self._busy_series[series] <= 0:
                del self._busy_series[series]
            self.in_flight.pop(series, None)
            del self._series_tasks[series]
            done.set()

    async def _download_whole(self, collection: str, series: str) -> list[str] | None:
        """Fetch the series' ZIP; None once done. When every attempt was cut short, the
        files the series lists instead, so that those it lacks come one by one.

        Some servers cut large ZIPs, and a link may drop more often than a ZIP lasts:
        there, no number of attempts brings the whole ZIP, while single files, each lost
        alone, always end. The files it brings are not confirmed by MD5 (the list ends
        the ZIP); the ZIP's entries were checked against their CRCs.
        """
        try:
            await self._with_attempts(f"series {series}", self._download_series,
                                      collection, series)
            return None
        except FetchFailed as exc:
            if not isinstance(exc.__cause__, TruncatedStream):
                raise
            listed = await self._listing(series)
            if not listed:
                raise
            log.warning("series %s: its ZIP was cut short at each of %d attempts (%s); "
                        "fetching the files it lacks one by one, which no MD5 list "
                        "confirms", series, self.attempts, exc.__cause__)
            return listed

    async def _listing(self, series: str) -> list[str] | None:
        """The SOP UIDs the series lists now; None when that is not known."""
        if self.instances_of is None:
            return None
        try:
            return await self.instances_of(series)
        except Exception as exc:  # no listing now: only the ZIP can bring the series
            log.info("series %s: its listing failed: %s", series, exc)
            return None

    async def _download_series(self, collection: str, series: str) -> None:
        assert self.client is not None
        progress = self.in_flight[series] = [0, 0]
        revision = self._revision[series]
        names: dict[str, tuple[str, str]] = {}  # entry name → (sop, md5)
        partly_cached = self.cached_count(series) > 0
        # Each file is hashed as stored, when it is published: not by the ZIP reader.
        async with self.client.open_series(collection, series, hash_entries=False) as stream:
            async for member in stream.members():
                blocks = member.chunks()
                head = await _head_of(blocks) if partly_cached else []
                known = self._cached_copy(head)
                if known is None:
                    known = await self._store(collection, series, revision, head, blocks,
                                              progress)
                else:  # cached already: not written again, but its CRC is still checked
                    progress[0] += sum(map(len, head))
                    async for block in blocks:
                        progress[0] += len(block)
                names[member.name] = known
                progress[1] += 1
            expected = stream.md5s
        self._check_revision(series, revision)  # the list may be of the new bytes
        self.stats.series_fetches += 1
        bad = self._confirm_md5s(series, names, expected)
        if bad:
            if self.on_refused is not None:
                for sop in bad:
                    await self.on_refused(sop)
            await self._fetch_again(collection, series, bad)
        self._complete_if_kept(series, collection, [sop for sop, _ in names.values()])

    def _complete_if_kept(self, series: str, collection: str, sops: list[str]) -> bool:
        """Mark the series complete, unless some of its files went before the rest came:
        evicted to make room for them (nothing else could go), or dropped as damaged on
        disk meanwhile. A prefetch job then reports it as lost, and a read fetches those
        files again."""
        gone = sum(sop not in self._lru for sop in sops)
        if gone:
            log.warning("series %s: %d of its %d files went before the rest came: evicted, "
                        "as the cache cannot hold it beside the data in use, or dropped",
                        series, gone, len(sops))
            return False
        self._mark_complete(series, collection)
        return True

    async def _store(self, collection: str, series: str, revision: int, head: list[bytes],
                     blocks: AsyncIterator[bytes], progress: list[int]) -> tuple[str, str]:
        """Write one ZIP entry to the cache and publish it; its SOP UID and MD5."""
        async with self._tmpfile(series) as tmp:
            for block in head:
                await tmp.write(block)
            progress[0] += tmp.size
            async for block in blocks:
                await tmp.write(block)
                progress[0] += len(block)
            return await self._publish(tmp, collection, series, revision)

    def _cached_copy(self, head: list[bytes]) -> tuple[str, str] | None:
        """The SOP UID and stored MD5 of the instance whose file starts with `head`, when
        the cache holds it already: the ZIP's copy need not be written again."""
        if not head:
            return None
        try:
            sop = _instance_uids(io.BytesIO(b"".join(head)), series_too=False,
                                 meta_too=False)[0]
        except FetchFailed:  # the header is longer than the head: store it as usual
            return None
        if sop not in self._lru or sop in self._stale:
            return None
        row = self.db.execute("SELECT md5 FROM instances WHERE sop=?", (sop,)).fetchone()
        return (sop, row[0]) if row else None

    async def _resumable(self, series: str) -> list[str] | None:
        """The files a partly cached series lists, when fetching those it lacks one by one
        leaves it as verified as the ZIP would, for less; None when the ZIP is better.

        A few files evicted, deleted or dropped as damaged would otherwise cost the whole
        series again. Every file the series lists must have been confirmed by an MD5 list
        of the service before (the index keeps those MD5s after eviction), so that each
        single fetched now is checked against its own. Single images come uncompressed,
        the ZIP about 2-3 times smaller for CT: up to a quarter missing, singles win, and
        they use several connections at once.
        """
        if not self.cached_count(series):
            return None
        listed = await self._listing(series)
        if not listed:
            return None
        confirmed = {sop for sop, in self.db.execute(
            "SELECT sop FROM instances WHERE series=? AND verified=1", (series,))}
        missing = [sop for sop in listed if sop not in self._lru]
        if len(missing) * RESUME_SHARE > len(listed) or not confirmed.issuperset(listed):
            return None
        return listed

    async def _download_missing(self, collection: str, series: str,
                                listed: list[str]) -> None:
        """Complete a partly cached series with getSingleImage, a few files at once."""
        missing = [sop for sop in listed if sop not in self._lru]
        if missing:
            log.info("series %s: fetching its %d missing files one by one", series,
                     len(missing))
        progress = self.in_flight[series] = [0, 0]
        revision = self._revision[series]
        todo = iter(missing)
        failed: list[FetchFailed] = []
        fatal: list[Exception] = []  # the cache itself cannot take more: stop at once

        async def worker(scope: trio.CancelScope) -> None:
            for sop in todo:
                try:
                    await self._fetch_one(collection, series, sop)
                except FetchFailed as exc:
                    failed.append(exc)
                    continue
                except (CacheFull, CacheDiskError) as exc:
                    fatal.append(exc)
                    scope.cancel()
                    return
                progress[0] += self._sizes.get(sop, 0)
                progress[1] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(min(RESUME_PARALLEL, len(missing))):
                nursery.start_soon(worker, nursery.cancel_scope)
        if fatal:
            raise fatal[0]
        if failed:
            raise FetchFailed(f"{len(failed)} of the {len(missing)} missing files of series "
                              f"{series} could not be fetched; the first: {failed[0]}"
                              ) from failed[0]
        self._check_revision(series, revision)
        if self._complete_if_kept(series, collection, listed):
            self.stats.series_resumed += 1

    def _mark_complete(self, series: str, collection: str) -> None:
        self.db.execute("INSERT INTO series(uid, collection, complete, fetched) VALUES "
                        "(?, ?, 1, ?) ON CONFLICT(uid) DO UPDATE SET complete=1, fetched=?",
                        (series, collection, time.time(), time.time()))
        self._complete.add(series)

    def _mark_incomplete(self, series: str | None) -> None:
        """One series, or all of them (None), no longer hold every file."""
        self.db.execute("UPDATE series SET complete=0 WHERE ? IS NULL OR uid=?",
                        (series, series))
        if series is None:
            self._complete.clear()
        else:
            self._complete.discard(series)

    def _confirm_md5s(self, series: str, names: dict[str, tuple[str, str]],
                      expected: dict[str, str]) -> dict[str, str | None]:
        """Mark the files that match the service's MD5 list verified; remove the others
        and return them, each with the MD5 the list gives (None: not listed)."""
        if not expected:
            return {}
        bad: dict[str, str | None] = {}
        for name, (sop, got) in names.items():
            want = expected.get(name)
            stored = self.db.execute("SELECT md5 FROM instances WHERE sop=?", (sop,)).fetchone()
            if want is not None and want == got and stored and stored[0] == got:
                self.db.execute("UPDATE instances SET verified=1 WHERE sop=?", (sop,))
            else:
                bad[sop] = want
        self.stats.md5_mismatches += len(bad)
        for sop, want in bad.items():
            if sop in self._lru:
                self._drop(sop)  # unlinked: no new open sees it
            if want is not None:
                self._service_md5.setdefault(series, {})[sop] = want
        return bad

    async def _fetch_again(self, collection: str, series: str,
                           bad: dict[str, str | None]) -> None:
        """Fetch the files that failed the MD5 list one by one, each checked against it.

        Damage on the way (a proxy, a flaky disk at the server) is gone the next time;
        what the service stores wrong stays wrong, and is refused.
        """
        failed = [sop for sop, want in bad.items() if want is None]
        in_a_row = 0
        for sop in (sop for sop, want in bad.items() if want is not None):
            if in_a_row >= 3:  # the service's own copies are bad: readers find out one by one
                failed.append(sop)
                continue
            log.info("series %s: fetching %s again after an MD5 mismatch", series, sop)
            try:
                while sop not in self._lru:  # a reader may be fetching it already
                    pending = self._fetching.get(sop)
                    if pending is None:
                        await self._fetch_single(collection, series, sop)
                    else:
                        await pending.wait()
                        if sop not in self._lru:
                            raise FetchFailed(f"instance {sop} could not be fetched")
                in_a_row = 0
            except FetchFailed as exc:
                log.warning("%s", exc)
                failed.append(sop)
                in_a_row += 1
        if failed:
            raise IntegrityError(f"{len(failed)} of the {len(bad)} files of series {series} "
                                 "that failed the service's MD5 check failed it again, "
                                 "fetched one by one; they are not served")

    # -- commands ------------------------------------------------------------------------

    def pin_series(self, series: str, collection: str, pinned: bool = True) -> None:
        self.db.execute("INSERT INTO series(uid, collection, pinned) VALUES (?, ?, ?) "
                        "ON CONFLICT(uid) DO UPDATE SET pinned=?",
                        (series, collection, int(pinned), int(pinned)))
        self.db.execute("UPDATE instances SET pinned=? WHERE series=?", (int(pinned), series))
        for sop, in self.db.execute("SELECT sop FROM instances WHERE series=?", (series,)):
            (self._pinned.add if pinned else self._pinned.discard)(sop)

    def discard(self, sops: list[str]) -> list[str]:
        """Drop files found damaged on disk, pinned ones too: no copy beats a bad one.
        Open ones stay, as their readers may hold their pages. Returns those dropped."""
        dropped = [sop for sop in sops if sop in self._lru and not self._open[sop]]
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
        row = self.db.execute("SELECT pinned FROM series WHERE uid=?", (series,)).fetchone()
        self._revision[series] += 1
        self._withdrawn.discard(series)  # back with new bytes, if it was withdrawn
        self._service_md5.pop(series, None)  # listed for the bytes from before
        self.failed_series.pop(series, None)  # the new ones may well fetch
        evicted = [sop for sop, in self.db.execute(
            "SELECT sop FROM instances WHERE series=? AND present=0", (series,))]
        dropped = self._clear(series, keep_pinned=False)
        self._forget_revised(dropped + evicted)  # sizes and MD5s of files evicted before too
        # Files held open keep their bytes for now; the last release drops them. The
        # index forgets them at once: should the daemon die first, the next start
        # deletes them as orphans instead of serving them.
        held = [s for s in self._lru if self._series_of.get(s) == series]
        self._stale.update(held)
        self.db.executemany("UPDATE instances SET present=0 WHERE sop=?", [(s,) for s in held])
        return dropped, bool(row and row[0])

    def series_withdrawn(self, series: str) -> tuple[int, int, int]:
        """The archive no longer lists the series: its cached files, of no use unless it
        comes back, are the first to go when room is needed. Nothing is deleted now, so a
        listing that was wrong costs nothing. Files a fetch under way still brings go
        first too. Returns files, bytes and pinned files."""
        self._withdrawn.add(series)
        sops = [sop for sop, in self.db.execute(
            "SELECT sop FROM instances WHERE series=? AND present=1", (series,))
            if sop in self._lru]
        for sop in sops:
            self._lru.move_to_end(sop, last=False)
            self._touched.pop(sop, None)  # their recency, kept on disk, is the oldest too
        self.db.execute("UPDATE instances SET last_access=0 WHERE series=?", (series,))
        return (len(sops), sum(self._lru[s] for s in sops),
                sum(s in self._pinned for s in sops))

    def series_back(self, series: str) -> None:
        """Listed again as it was: files fetched from now on are used as any others."""
        self._withdrawn.discard(series)

    def _forget_revised(self, sops: list[str]) -> None:
        """Forget all about files dropped as stale: the new ones may differ in size too."""
        for sop in sops:
            self._sizes.pop(sop, None)
        self.db.executemany("DELETE FROM instances WHERE sop=?", [(sop,) for sop in sops])

    def _clear(self, series: str | None, *, keep_pinned: bool) -> list[str]:
        victims = [s for s in list(self._lru)
                   if (series is None or self._series_of.get(s) == series)
                   and not self._open[s] and not (keep_pinned and s in self._pinned)]
        for sop in victims:
            self._drop(sop)
        self._mark_incomplete(series)
        return victims

    def save_counters(self) -> None:
        touched = [(t, sop) for sop, t in self._touched.items()]
        counts = [("hits", str(self.stats.hits)), ("misses", str(self.stats.misses))]
        self._touched.clear()
        self._unsaved_opens = 0
        # Recency and statistics are hints, never worth a failed open.
        with contextlib.suppress(sqlite3.Error), transaction(self.db):
            self.db.executemany("UPDATE instances SET last_access=? WHERE sop=?", touched)
            self.db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", counts)

    def close(self) -> None:
        self.save_counters()
        self.db.close()


RESERVE_STEP = 1 << 20
RESUME_SHARE = 4  # a confirmed series lacking at most 1/4 of its files gets singles
RESUME_PARALLEL = 4  # singles of one series fetched at once
HEAD_BYTES = 16 << 10  # DICOM headers name the SOP Instance UID well within this
REINDEX_REPORT_EVERY = 10.0  # seconds; systemd is told to wait 60 s more each time
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
_SERIES_INSTANCE_UID = Tag(0x0020, 0x000E)
_MD5 = functools.partial(hashlib.md5, usedforsecurity=False)  # a checksum, not security


class _TmpFile:
    """A download in progress, with room reserved ahead in steps."""

    def __init__(self, cache: Cache, series: str, expected: int | None = None) -> None:
        self.cache = cache
        self.series = series
        self.expected = expected
        self.path = cache.root / "tmp" / f"{os.getpid()}-{random.getrandbits(64):016x}"
        with _cache_disk(cache.root):
            try:
                self.fd: int | None = os.open(self.path, _TMP_FLAGS, 0o600)
            except FileNotFoundError:  # a cleaner of old, empty directories took tmp/
                self.path.parent.mkdir(mode=0o700, exist_ok=True)
                self.fd = os.open(self.path, _TMP_FLAGS, 0o600)
        self.size = 0
        self.reserved = 0
        self._kept = False

    async def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.reserved:
            self._reserve_for(len(chunk))
        self.size += len(chunk)
        offset = self.size - len(chunk)
        try:
            with _cache_disk(self.cache.root, full_too=False):
                _write_all(self.fd, chunk, offset)
        except OSError as exc:
            # The disk (or the user's quota) filled for reasons outside the cache: make
            # room once, then write the chunk again at its own offset (part of it may be
            # there already).
            full = f"disk full ({self.cache.root}) while caching series {self.series}"
            try:
                self.cache._evict(len(chunk), self.series)
            except CacheFull:
                raise CacheFull(f"{full}; every cached file is open or pinned") from exc
            with _cache_disk(self.cache.root):
                _write_all(self.fd, chunk, offset)

    def _reserve_for(self, nbytes: int) -> None:
        """Reserve the expected rest of the file, or a MiB ahead: far fewer calls than one
        per chunk; what stays unused is given back when the file is published. Near a
        full cache, fall back to exactly what this chunk needs."""
        need = self.size + nbytes - self.reserved
        ahead = (self.expected - self.reserved if self.expected and self.expected > self.size
                 else RESERVE_STEP)
        step = max(need, ahead)
        try:
            self.cache._reserve(step, self.series)
        except CacheFull:
            if step == need:
                raise
            # Reclaiming may have settled this very file: ask again for what it lacks.
            step = self.size + nbytes - self.reserved
            self.cache._reserve(step, self.series)
        self.reserved += step

    def settle(self) -> None:
        """Give back the reserved room the finished file did not use."""
        self.cache._unreserve(self.reserved - self.size)
        self.reserved = self.size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def adopted(self) -> None:
        self._kept = True

    def discard(self) -> None:
        self.close()
        if not self._kept:
            self.cache._unreserve(self.reserved)
            self.reserved = 0
            self.path.unlink(missing_ok=True)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_DB_DISK_ERRORS = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR)  # primary result codes


def _may_pass(exc: BaseException | None) -> bool:
    """Whether a failure is the service's or the network's, which may pass, rather than
    a refusal (unknown series, no permission), damage or a full cache."""
    while exc is not None:
        if isinstance(exc, (ServerError, MalformedResponse)):
            return True
        if isinstance(exc, (NotFound, AuthError, IntegrityError, CacheFull, CacheDiskError)):
            return False
        exc = exc.__cause__
    return False


@contextlib.contextmanager
def _cache_disk(root: Path, *, full_too: bool = True) -> Iterator[None]:
    """The cache disk's own failures as clear errors: CacheFull when it is full (unless
    the caller handles that: then the OSError passes), CacheDiskError otherwise. Neither
    is worth fetching again for."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            if not full_too:
                raise
            raise CacheFull(f"disk full ({root}): {exc.strerror}") from exc
        raise CacheDiskError(f"cache directory {root} cannot be written: "
                             f"{exc.strerror or exc}") from exc


async def _head_of(blocks: AsyncIterator[bytes]) -> list[bytes]:
    """The first blocks of a ZIP entry, enough to hold its DICOM header's UIDs."""
    head: list[bytes] = []
    size = 0
    while size < HEAD_BYTES:
        block = await anext(blocks, None)
        if block is None:
            break
        head.append(block)
        size += len(block)
    return head


def _write_all(fd: int | None, data: bytes, offset: int) -> None:
    assert fd is not None
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _finish_file(fd: int | None, path: Path, root: Path) -> tuple[str, str]:
    """fsync the file; return its SOP Instance UID and the MD5 of its bytes; make sure
    the directory it goes to exists (the first file of each of the 256 creates it).

    For a worker thread: what it waits for (the disk, the journal) and what it computes
    (hashlib lets go of the GIL) would otherwise hold up the event loop. The bytes are
    hashed as stored, not as they arrived.
    """
    assert fd is not None
    os.fsync(fd)
    with open(path, "rb") as stored:
        md5 = hashlib.file_digest(stored, _MD5).hexdigest()
        stored.seek(0)
        sop = _instance_uids(stored, series_too=False)[0]
    parent = object_path(root, sop).parent
    if not parent.is_dir():  # objects/ too may have been taken, empty, by a cleaner
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return sop, md5


def _instance_uids(stored: BinaryIO, *, series_too: bool = True,
                   meta_too: bool = True) -> tuple[str, str]:
    """SOPInstanceUID (and SeriesInstanceUID) from a file's header; with `meta_too`,
    the file meta's MediaStorageSOPInstanceUID stands in for a missing one."""
    last = _SERIES_INSTANCE_UID if series_too else _SOP_INSTANCE_UID
    try:
        # Parsing stops past the last UID wanted: the rest is never needed here.
        ds = read_partial(stored, stop_when=lambda tag, vr, length: tag > last,
                          specific_tags=[_SOP_INSTANCE_UID, last])
        sop = ds.get("SOPInstanceUID") or (
            ds.file_meta.get("MediaStorageSOPInstanceUID") if meta_too else None)
        series = ds.get("SeriesInstanceUID") if series_too else ""
    except Exception as exc:  # pydicom raises many kinds for a body that is not DICOM
        raise FetchFailed(f"not a DICOM file: {exc}") from exc
    if not sop:
        raise FetchFailed("DICOM file without a SOPInstanceUID")
    if series_too and not series:
        raise FetchFailed("DICOM file without a SeriesInstanceUID")
    return str(sop), str(series)


def _open_index_db(path: Path) -> tuple[sqlite3.Connection, list[tuple]]:
    """The index, and the files it lists: reading them all shows damage now."""
    db = open_db(path)
    try:
        db.executescript(_SCHEMA)
        return db, _indexed(db)
    except BaseException:
        db.close()
        raise


def _indexed(db: sqlite3.Connection) -> list[tuple]:
    """The files the index lists as present, least recently used first."""
    return db.execute("SELECT sop, series, size, pinned FROM instances WHERE present=1 "
                      "ORDER BY last_access").fetchall()


def _reindex(db: sqlite3.Connection, root: Path,
             progress: Callable[[int], None]) -> tuple[int, int]:
    """Index every readable cached file anew (unverified); what cannot be read stays
    out, and the reconcile that follows deletes it. Returns files and bytes; calls
    `progress` with the count so far every REINDEX_REPORT_EVERY seconds."""
    listed = _listed_series(root)
    rows = []
    next_report = time.monotonic() + REINDEX_REPORT_EVERY
    for path in (root / "objects").glob("*/*"):
        if time.monotonic() >= next_report:
            progress(len(rows))
            next_report = time.monotonic() + REINDEX_REPORT_EVERY
        try:
            with path.open("rb") as stored:
                sop, series = _instance_uids(stored)
                stored.seek(0)
                md5 = hashlib.file_digest(stored, _MD5).hexdigest()
            info = path.stat()
        except (OSError, FetchFailed):
            continue
        if path.name == _object_name(sop):
            collection = listed.get(series, ("", None))[0]
            rows.append((sop, series, collection, info.st_size, md5, info.st_mtime))
    with transaction(db):
        db.executemany("INSERT OR REPLACE INTO instances(sop, series, collection, size, md5, "
                       "verified, present, last_access, pinned) "
                       "VALUES (?, ?, ?, ?, ?, 0, 1, ?, 0)", rows)
        # A series holding as many files as its listing counted needs no fetch again.
        counts = collections.Counter(row[1] for row in rows)
        db.executemany("INSERT OR REPLACE INTO series(uid, collection, complete) "
                       "VALUES (?, ?, 1)",
                       [(series, listed[series][0]) for series, n in counts.items()
                        if series in listed and listed[series][1] == n])
    return len(rows), sum(row[3] for row in rows)


def _listed_series(root: Path) -> dict[str, tuple[str, int | None]]:
    """Collection and image count of each series the mounts' catalogs listed."""
    rows = stored_rows(root, "SELECT ident, collection, meta FROM nodes WHERE kind=?",
                       (int(Kind.SERIES),))
    return {uid: (collection, json.loads(meta).get("image_count"))
            for uid, collection, meta in rows}


def object_path(root: Path, sop: str) -> Path:
    name = _object_name(sop)
    return root / "objects" / name[:2] / name


@functools.lru_cache(maxsize=1 << 16)  # a warm open asks for it again and again
def _object_name(sop: str) -> str:
    # Hashing keeps any UID the server sends ('/', '..', 1,000 bytes) a safe file name.
    return hashlib.sha256(sop.encode()).hexdigest()[:40]
