"""One file from the service into the cache: single flight, attempts, the checks, and
publishing it (fsync, rename, index).

A file becomes visible (in `Contents` and the index) only in `publish`, after its bytes
are complete, checked and renamed into place (docs/design/cache.md, "Invariants").
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from tciafs.backoff import Backoff
from tciafs.sources.base import ChecksumMismatch, ClientError, NotFound, Source, TruncatedStream

from .contents import Contents
from .index import Index
from .model import BadCopy, CacheFull, CacheStats, FetchFailed, IntegrityError
from .space import Space
from .store import Store, TmpFile

log = logging.getLogger("tciafs.cache")

# Between fetches of bytes that came cut short or damaged: the transport's own retries
# end at the first byte.
REFETCH = Backoff(base=0.4, cap=8.0, jitter=0.5)


class Fetcher:
    def __init__(self, source: Source | None, attempts: int, store: Store, space: Space,
                 index: Index, contents: Contents, stats: CacheStats) -> None:
        self.source = source
        self.attempts = attempts
        self.store = store
        self.space = space
        self.index = index
        self.contents = contents
        self.stats = stats
        # Single flight: the download of each file under way, set when it ends.
        self._fetching: dict[str, trio.Event] = {}
        # Files a reader waits to see a series fetch bring, set when they are published.
        self._published: dict[str, trio.Event] = {}
        # Counts each series' re-submissions seen: a download that began before the last
        # one may carry the old bytes, and is not published.
        self.revision: collections.Counter[str] = collections.Counter()
        # The MD5s the service listed for files whose bytes disagreed, by series: a file
        # fetched again is checked against them, and served only if it matches.
        self.service_md5: dict[str, dict[str, str]] = {}
        # Series re-submitted since their last whole fetch: a shared site cache may still
        # hold the old bytes, so their downloads ask past it until a ZIP comes fresh.
        self.revised: set[str] = set()
        # Told of each file published whole: parts of it kept as blocks go (blocks.py).
        self.on_whole: Callable[[str], None] | None = None

    @property
    def fetching(self) -> Mapping[str, trio.Event]:
        """The files being downloaded now, alone: a series fetch leaves them to that."""
        return self._fetching

    def series_revised(self, series: str) -> None:
        """Downloads of the series under way now bring the old bytes; the MD5s its list
        gave were for those too."""
        self.revision[series] += 1
        self.service_md5.pop(series, None)
        self.revised.add(series)

    # -- single flight -------------------------------------------------------------------

    async def fetch_one(self, collection: str, series: str, sop: str) -> None:
        """Fetch the instance alone, unless a fetch of it is under way: then wait for
        that one (and try again should it fail)."""
        while sop not in self.contents.files:
            pending = self._fetching.get(sop)
            if pending is not None:
                await pending.wait()
                continue
            await self.fetch_single(collection, series, sop)

    async def fetch_or_join(self, collection: str, series: str, sop: str) -> None:
        """Fetch the instance alone, or wait for the fetch of it under way; fail when
        that one fails."""
        while sop not in self.contents.files:
            pending = self._fetching.get(sop)
            if pending is None:
                await self.fetch_single(collection, series, sop)
            else:
                await pending.wait()
                if sop not in self.contents.files:
                    raise FetchFailed(f"instance {sop} could not be fetched")

    async def fetch_single(self, collection: str, series: str, sop: str) -> None:
        # The check that no fetch is under way (the callers') and this entry happen with
        # no await between: docs/design/cache.md, "Concurrency".
        done = self._fetching[sop] = trio.Event()
        try:
            await self.with_attempts(f"instance {sop}", self._download_single,
                                     collection, series, sop)
        finally:
            del self._fetching[sop]
            done.set()

    async def published_soon(self, sop: str, within: float) -> None:
        """Wait up to `within` seconds for a series fetch under way to bring the file."""
        event = self._published.get(sop)
        if event is None:
            event = self._published[sop] = trio.Event()
        with trio.move_on_after(within):
            await event.wait()

    # -- one download --------------------------------------------------------------------

    async def with_attempts(self, what: str, func: Callable[..., Awaitable[None]],
                            *args: Any) -> None:
        """Run a download up to `attempts` times. After bytes that came whole but wrong,
        the next attempt passes fresh=True: it asks past any shared site cache, whose copy
        may be the damaged one, and the fresh answer replaces it there."""
        fresh = False
        for attempt in range(1, self.attempts + 1):
            try:
                await func(*args, fresh=fresh)
                return
            except (CacheFull, IntegrityError):
                raise
            except NotFound as exc:
                # It was listed, so "unknown" here means the service is failing (NBIA
                # answers both with the same 500): an I/O error, not a missing file.
                raise FetchFailed(f"{what}: the service no longer serves it: {exc}") from exc
            except (TruncatedStream, ChecksumMismatch, BadCopy) as exc:
                # The client retries only until the first byte: a body cut short or
                # damaged on the way is fetched again here. A cut body is never kept by
                # a site cache; a damaged or wrong one may be.
                fresh = fresh or not isinstance(exc, TruncatedStream)
                await self._before_retry(what, attempt, exc)
            except ClientError as exc:
                # The client already retried with back-off: failing again here would
                # only multiply the wait before the reader gets its EIO.
                raise FetchFailed(f"{what}: {exc}") from exc
            except FetchFailed as exc:
                await self._before_retry(what, attempt, exc)

    async def _before_retry(self, what: str, attempt: int, exc: Exception) -> None:
        if attempt == self.attempts:
            raise FetchFailed(f"{what}: {exc}") from exc
        log.info("retrying %s after: %s", what, exc)
        await trio.sleep(REFETCH.delay(attempt - 1))

    async def _download_single(self, collection: str, series: str, sop: str, *,
                               fresh: bool = False) -> None:
        """One file by itself, checked against an MD5 before a reader sees it: the one a
        series' list gave, else the source's own for this instance, asked alongside the
        download so that it costs no time to first byte. Without either (NBIA: an image
        of a restricted collection) the file is kept unconfirmed."""
        assert self.source is not None
        revision = self.revision[series]
        fresh = fresh or series in self.revised
        md5 = InstanceMd5(self._listed_md5(series, sop),
                          askable=self.source.capabilities.instance_checksums)
        if md5.known or not md5.askable:
            await self._download_checked(collection, series, sop, revision, fresh, md5)
            return
        failed: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(md5.ask, self.source, collection, series, sop, fresh,
                               nursery.cancel_scope)
            try:
                await self._download_checked(collection, series, sop, revision, fresh, md5)
            except Exception as exc:  # raised below as itself, not in an exception group
                failed.append(exc)
            nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if md5.error is not None:  # it ended the download
            raise md5.error

    async def _download_checked(self, collection: str, series: str, sop: str,
                                revision: int, fresh: bool, md5: InstanceMd5) -> None:
        assert self.source is not None
        async with contextlib.AsyncExitStack() as keep:  # the downloaded file
            async with self.source.open_instance(collection, series, sop,
                                                 fresh=fresh) as stream:
                tmp = await keep.enter_async_context(
                    self.download(series, expected=stream.size))
                async for chunk in stream.chunks():
                    await tmp.write(chunk)
                if stream.size is not None and tmp.size != stream.size:
                    raise BadCopy(f"got {tmp.size} of {stream.size} bytes")
            # The connection goes back to the pool before the MD5 is waited for: the MD5
            # request may need it, and downloads that each held one while they waited
            # would leave none for the requests they wait on.
            await self.publish(tmp, collection, series, revision, expect_sop=sop,
                               expect_md5=await md5.result())
        self.stats.single_fetches += 1

    def _listed_md5(self, series: str, sop: str) -> str | None:
        """The MD5 the service listed for an instance, if any list named it: the one of
        a fetch under way, else the one that confirmed an earlier copy, since evicted or
        lost (a re-submission forgets those)."""
        listed = self.service_md5.get(series, {}).get(sop)
        return listed if listed is not None else self.index.md5(sop, verified=True)

    @asynccontextmanager
    async def download(self, series: str, expected: int | None = None
                       ) -> AsyncIterator[TmpFile]:
        """A file in tmp/ to write a download to; gone afterwards unless published."""
        with self.space.reservation(series, expected) as room:
            tmp = self.store.tmpfile(room, hashed=True)
            try:
                yield tmp
            finally:
                tmp.discard()

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, tmp: TmpFile, collection: str, series: str, revision: int, *,
                      expect_sop: str | None = None, expect_md5: str | None = None
                      ) -> tuple[str, str]:
        """Check, fsync and rename a finished download into place; return its SOP UID
        and the MD5 of its bytes as stored. With expect_md5, only those bytes will do,
        and the file is indexed as verified. `revision`: the series' when the download
        began."""
        sop, md5 = await self.store.finish(tmp)
        return self._place(tmp, sop, md5, collection, series, revision,
                           expect_sop=expect_sop, expect_md5=expect_md5)

    async def publish_all(self, tmps: Sequence[TmpFile], collection: str, series: str,
                          revision: int) -> list[tuple[str, str]]:
        """`publish` several finished downloads of a series (the entries of its ZIP) with
        one fsync job for all: each is still fsynced before it is renamed and indexed."""
        finished = await self.store.finish_all(tmps)
        # No await from here: every file's check, rename, row and entry in memory.
        return [self._place(tmp, sop, md5, collection, series, revision)
                for tmp, (sop, md5) in zip(tmps, finished, strict=True)]

    def awaited(self, sop: str) -> bool:
        """Whether a reader waits for a series fetch to bring the file."""
        return sop in self._published

    def _place(self, tmp: TmpFile, sop: str, md5: str, collection: str, series: str,
               revision: int, *, expect_sop: str | None = None,
               expect_md5: str | None = None) -> tuple[str, str]:
        """The rest of `publish`, after the fsync: check, rename, index, show. No await:
        the file appears in the index and in memory at once (docs/design/cache.md,
        "Concurrency")."""
        self.check_revision(series, revision)
        if expect_sop is not None and sop != expect_sop:
            if self.source is None or self.source.capabilities.names_are_sop_uids:
                raise BadCopy(f"server sent instance {sop!r} when asked for {expect_sop!r}")
            sop = expect_sop  # the source's own name, which the tree asks for it by
            self.store.path(sop).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.store.path(sop)
        if not self.space.knows_dir(final.parent):  # the thread may have just made it
            self.space.measure_dir(final.parent)
        if expect_md5 is not None and md5 != expect_md5:
            self.stats.md5_mismatches += 1
            raise BadCopy(f"instance {sop}: MD5 {md5}, the service gives {expect_md5}")
        if sop in self.contents.files:  # another path delivered it first
            return sop, md5
        tmp.room.settle()
        self.store.place(tmp, sop)
        withdrawn = series in self.contents.withdrawn  # a fetch still under way brought it
        # The file goes in before its row: a crash in between leaves an orphan, which
        # the next start deletes, never a row without its file.
        try:
            self.index.add(sop, series, collection, tmp.size, md5,
                           verified=expect_md5 is not None,
                           last_access=0.0 if withdrawn else time.time(),
                           make_room=lambda: self.space.evict(1, series))
        except BaseException:
            final.unlink(missing_ok=True)  # not served without its row
            raise
        self.space.measure_dir(final.parent)
        tmp.adopted()
        self.contents.add(sop, series, tmp.size, pinned=self.index.file_pinned(sop),
                          oldest=withdrawn)
        if expect_md5 is not None:
            self.service_md5.get(series, {}).pop(sop, None)
        self.stats.bytes_fetched += tmp.size
        if self.on_whole is not None:
            self.on_whole(sop)
        event = self._published.pop(sop, None)
        if event is not None:
            event.set()
        return sop, md5

    def check_revision(self, series: str, revision: int) -> None:
        """Refuse what a download begun before the series' last re-submission brought."""
        if self.revision[series] != revision:
            raise FetchFailed(f"series {series} was re-submitted during the download")


class InstanceMd5:
    """The MD5 a file fetched alone must match: known before the download (a series'
    list gave it), or asked of the source while the bytes come."""

    def __init__(self, known: str | None, *, askable: bool) -> None:
        """`askable`: the source gives instance MD5s (`instance_checksums`); a file with
        neither a known MD5 nor a source to ask is kept unconfirmed, with no wait."""
        self.md5 = known
        self.known = known is not None
        self.askable = askable
        self.error: ClientError | None = None
        self._answered = trio.Event()
        if self.known or not askable:
            self._answered.set()

    async def ask(self, source: Source, collection: str, series: str, sop: str,
                  fresh: bool, download: trio.CancelScope) -> None:
        """Ask the source; when that fails, end the download too (`download`): the
        bytes could not be checked, so they would not be kept."""
        try:
            self.md5 = await source.instance_md5(collection, series, sop, fresh=fresh)
        except ClientError as exc:
            self.error = exc
            download.cancel()
        finally:
            self._answered.set()

    async def result(self) -> str | None:
        """The MD5, once the source answered; None when it gives none for the file."""
        await self._answered.wait()
        if self.error is not None:
            raise self.error
        return self.md5
