"""A series over several connections at once, within polite caps.

NBIA sends a series as one ZIP over one connection, and a connection is capped (TCIA users
report per-connection limits; the emulator shapes each answer to 20 MB/s). While the ZIP
streams from its front, a few workers fetch single images from the back of the series'
listing (`Singles`), each checked against its own MD5 (cache/fetch.py, `InstanceMd5`), so
that the two meet: the series is whole when they do, not when the ZIP ends.

Why the back of the listing is the back of the ZIP: neither getImage nor getSOPInstanceUIDs
sorts its rows, so both come in the database's order (docs/nbia-wire.md), and the tree
keeps a listing in the order it came (readdir order, the order `cp -r` reads). Should the
two orders differ, the workers still take only files nothing has brought, and the series
is whole no later than its ZIP's end, as with one stream.

The ZIP skips writing what a single brought, and still runs to its end, whose MD5 list
confirms every file, as before. A worker takes no file the ZIP is writing (or holds to
publish with its batch), and the ZIP writes a file whose single is under way all the
same (its bytes come with it anyway): a single that fails then costs nothing.

The link, as measured, decides when: workers start only once the ZIP's measured rate says
it has more left than a single image costs, and each worker stops when the ZIP would bring
the rest before its next single would come.

Caps (docs/connections.md): a series uses at most `per_series` connections (its ZIP and
its workers), and all series together at most `per_mount` (`Connections`). A worker that
finds the mount's cap reached is simply not started: extra connections never wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from .contents import Contents
from .fetch import Fetcher
from .model import CacheDiskError, CacheFull

log = logging.getLogger("tciafs.cache")


# The ZIP must have brought this many files before its rate is trusted ...
MEASURE_AFTER = 3
# ... and run this long after its first file (the request's round trip is not its rate):
# a ZIP done sooner never starts a worker.
MEASURE_SECONDS = 0.15
# Extra connections start only when the ZIP has at least this much left, at its rate:
# below that, a single's round trip gains nothing worth another connection.
WORTH_SECONDS = 1.0
# Until a single was timed: one round trip plus a file at the ZIP's own rate.
FIRST_SINGLE_GUESS = 0.25
LOOK_EVERY = 0.1  # seconds between two looks at whether to start another worker


class Connections:
    """The caps on a mount's background connections: per series, and in all."""

    def __init__(self, per_series: int, per_mount: int) -> None:
        self.per_series = max(1, per_series)
        self.per_mount = max(1, per_mount)
        self.mount = trio.CapacityLimiter(self.per_mount)
        self.single_seconds: float | None = None  # a single's time, as measured lately

    def zips_waiting(self) -> bool:
        """Whether a series stream waits for the mount's cap: a connection brings
        several times more files as a ZIP than as singles, so singles give way."""
        return self.mount.statistics().tasks_waiting > 0

    def timed_single(self, seconds: float) -> None:
        """Keep a running average of how long one single image takes, start to end."""
        old = self.single_seconds
        self.single_seconds = seconds if old is None else 0.7 * old + 0.3 * seconds


@dataclass
class ZipProgress:
    """What a series' ZIP has done so far, as its reader counts it."""

    files: int = 0
    first_at: float | None = None  # when its first file had come
    # The SOP UIDs of the entry it writes and of those waiting in its batch to be
    # published (prefetch.ZipBatch): no single is fetched for them.
    writing: set[str] = field(default_factory=set)
    done: bool = False
    # Read each entry's header before writing it, to tell which file it is: needed only
    # while singles run beside it (a header read costs about 0.3 ms of CPU per file).
    look: bool = False
    ended: trio.Event = field(default_factory=trio.Event)

    def entry_done(self) -> None:
        self.files += 1
        if self.first_at is None:
            self.first_at = time.monotonic()

    def finish(self) -> None:
        self.done = True
        self.ended.set()

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when the ZIP ends first: the series' MD5 list waits
        for whatever runs beside the ZIP to end."""
        with trio.move_on_after(seconds):
            await self.ended.wait()

    def long_enough(self) -> bool:
        """Whether the ZIP has ended, or has run long enough that its rate tells whether
        more connections would gain."""
        return self.done or (self.first_at is not None and self.files >= MEASURE_AFTER
                             and time.monotonic() - self.first_at >= MEASURE_SECONDS)

    def rate(self) -> float | None:
        """Files a second since its first file came; None until it has brought enough
        to tell."""
        if self.first_at is None or self.files < MEASURE_AFTER:
            return None
        return (self.files - 1) / max(time.monotonic() - self.first_at, 1e-3)


class Singles:
    """Single images from the back of a series' listing while its ZIP comes from the front."""

    def __init__(self, fetcher: Fetcher, contents: Contents, connections: Connections,
                 collection: str, series: str, listed: Sequence[str],
                 zip_progress: ZipProgress) -> None:
        self.fetcher = fetcher
        self.contents = contents
        self.connections = connections
        self.collection = collection
        self.series = series
        self.listed = listed
        self.zip = zip_progress
        self._next = len(listed) - 1  # the back of the listing not yet looked at
        self.workers = 0  # running now
        self.peak = 0  # the most that ran at once
        self.fetched = 0
        self.stopped: BaseException | None = None  # the cache cannot take more

    async def run(self) -> None:
        """Start workers while it is worth it and the caps allow; returns when the ZIP
        has ended and every worker with it (a single under way is let finish)."""
        # From the next entry on, the ZIP names each before writing it: no worker takes
        # a file it writes.
        self.zip.look = True
        named_from = self.zip.files + 1
        while self.zip.files < named_from and not self.zip.done:
            await self.zip.pause(LOOK_EVERY / 10)
        try:
            async with trio.open_nursery() as nursery:
                while not self.zip.done and self.stopped is None:
                    # As many as the link calls for at once: a worker started a look
                    # later meets the ZIP that much further back.
                    while self._wants_another():
                        token = self._take_connection()
                        if token is None:
                            break
                        self.workers += 1
                        self.peak = max(self.peak, self.workers)
                        nursery.start_soon(self._worker, token)
                    await self.zip.pause(LOOK_EVERY)
        finally:  # also when the ZIP's end cancels the singles still under way
            if self.fetched:
                log.info("series %s: %d files came alone beside its ZIP, on up to %d "
                         "more connections", self.series, self.fetched, self.peak)

    def _take_connection(self) -> object | None:
        """A token of the mount's cap for one more worker; None when it is reached:
        an extra connection never waits for one."""
        token = object()
        try:
            self.connections.mount.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return None
        return token

    def _wants_another(self) -> bool:
        if self.workers >= self.connections.per_series - 1:  # the ZIP holds one
            return False
        if not self._room_for_singles():
            return False
        rate = self.zip.rate()
        if rate is None:
            return False
        return self._missing() / rate > max(WORTH_SECONDS, 2 * self._single_seconds())

    def _room_for_singles(self) -> bool:
        """No other series' ZIP waits for a connection, and the cache has room to spare."""
        return (not self.connections.zips_waiting()
                and self.fetcher.space.room_for_extras())

    def _single_seconds(self) -> float:
        measured = self.connections.single_seconds
        return FIRST_SINGLE_GUESS if measured is None else measured

    def _missing(self) -> int:
        return max(0, len(self.listed) - self.contents.series_files[self.series])

    def _worth_one_more(self) -> bool:
        """Whether a single started now would come before the ZIP and the other workers
        bring every file still missing."""
        if self.zip.done or self.stopped is not None or not self._room_for_singles():
            return False
        rate = self.zip.rate() or 0.0
        others = self.workers - 1
        return self._missing() > rate * self._single_seconds() + others

    def _pick(self) -> str | None:
        """The last listed file that nothing has and nothing is bringing. Checked and
        taken with no await between (single flight: docs/design/cache.md)."""
        while self._next >= 0:
            sop = self.listed[self._next]
            self._next -= 1
            if (sop not in self.contents.files and sop not in self.fetcher.fetching
                    and sop not in self.zip.writing):
                return sop
        return None

    async def _worker(self, token: object) -> None:
        try:
            while self._worth_one_more():
                sop = self._pick()
                if sop is None:
                    return
                started = time.monotonic()
                try:
                    await self.fetcher.fetch_single(self.collection, self.series, sop)
                except (CacheFull, CacheDiskError) as exc:
                    self.stopped = exc
                    return
                except Exception as exc:
                    # The ZIP still brings it. Singles that fail (damaged at the source,
                    # refused) are not worth this connection: the worker ends.
                    log.info("series %s: a single beside its ZIP failed: %s", self.series,
                             exc)
                    return
                self.connections.timed_single(time.monotonic() - started)
                self.fetched += 1
        finally:
            self.workers -= 1
            self.connections.mount.release_on_behalf_of(token)
