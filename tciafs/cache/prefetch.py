"""Whole series in the background: the ZIP stream, the resume of a partly cached series,
the service's MD5 list, and the file-by-file fallback when every ZIP comes cut short.

Each series has at most one task (`tasks`), and `series_parallel` of them fetch at once
(docs/design/cache.md, "Concurrency"). A series may use a few connections at once, within
the caps of `Connections` (cache/parallel.py, docs/connections.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from tciafs.sources.base import ClientError, SeriesStream, TruncatedStream

from .contents import Contents, Holds
from .failures import may_pass
from .fetch import Fetcher
from .index import Index
from .model import BadCopy, CacheDiskError, CacheFull, CacheStats, FetchFailed, IntegrityError
from .parallel import LOOK_EVERY, Connections, Singles, ZipProgress
from .store import HEAD_BYTES, TmpFile, sop_in_head

log = logging.getLogger("tciafs.cache")

RESUME_SHARE = 4  # a confirmed series lacking at most 1/4 of its files gets singles
REFETCH_IN_A_ROW = 3  # MD5 mismatches fetched again in a row that fail it again: stop
BATCH_FILES = 8  # a ZIP's finished files fsynced in one worker-thread job, at most
BATCH_SECONDS = 0.05  # ... and the longest the first of them waits for the others


class Prefetcher:
    def __init__(self, fetcher: Fetcher, index: Index, contents: Contents, holds: Holds,
                 stats: CacheStats, drop: Callable[[str], None], series_parallel: int,
                 connections: Connections | None = None) -> None:
        """`drop` takes a cached file out of the cache: one the MD5 list refuses.
        `connections`: the caps on connections per series and per mount."""
        self.fetcher = fetcher
        self.index = index
        self.contents = contents
        self.holds = holds
        self.stats = stats
        self.drop = drop
        self.tasks: dict[str, trio.Event] = {}  # series → set when its fetch ends
        self.limiter = trio.CapacityLimiter(series_parallel)
        self.connections = connections or Connections(4, 8)
        self.singles: dict[str, Singles] = {}  # series → its singles beside the ZIP now
        self._nursery: trio.Nursery | None = None
        self.in_flight: dict[str, list[int]] = {}  # series → [bytes so far, instances so far]
        self.failed: dict[str, str] = {}  # series → why its last fetch failed
        self.may_pass: set[str] = set()  # ... when the service or the network was at fault
        # Told of each file whose bytes the service's MD5 list refused, once removed here:
        # copies of them elsewhere (the kernel's page cache) must go too.
        self.on_refused: Callable[[str], Awaitable[None]] | None = None
        # The SOP Instance UIDs a series lists, or None when it is not known: a series
        # already partly cached then fetches only the files it lacks.
        self.instances_of: Callable[[str], Awaitable[list[str] | None]] | None = None
        # The same, only when known without a request: single images beside a ZIP go the
        # way its readers go, and never cost a listing of their own.
        self.held_instances_of: Callable[[str], list[str] | None] | None = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background series fetches; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def failed_for_now(self, series: str) -> bool:
        """The series' last fetch failed for a reason that may pass (the service down,
        the network gone, a body cut short): worth trying again later."""
        return series in self.failed and series in self.may_pass

    def start(self, collection: str, series: str) -> trio.Event:
        """Fetch a whole series in the background (once); returns its completion event."""
        event = self.tasks.get(series)
        if event is None and self._nursery is None:
            raise FetchFailed("the cache's background task is not running")
        if event is None:
            # Check and entry with no await between: one task per series
            # (docs/design/cache.md, "Concurrency").
            event = self.tasks[series] = trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._series_task, collection, series, event)
        return event

    async def _series_task(self, collection: str, series: str, done: trio.Event) -> None:
        self.holds.take_series(series)
        try:
            async with self.limiter:
                listed = await self._resumable(series)
                how = "resumed"
                if listed is None and not self._streams_series():
                    listed, how = await self._listing(series), "by file"
                    if not listed:
                        raise FetchFailed(f"series {series}: its files are not listed")
                elif listed is None:
                    listed, how = await self._download_whole(collection, series), "cut short"
                if listed is not None and await self._download_missing(collection, series,
                                                                       listed):
                    self.stats.series_resumed += how == "resumed"
                    self.stats.series_cut_short += how == "cut short"
                    self.stats.series_fetches += how == "by file"
            self.failed.pop(series, None)
            self.may_pass.discard(series)
        except (ClientError, FetchFailed, CacheFull, CacheDiskError) as exc:
            log.error("series fetch failed: %s", exc)
            self.failed[series] = str(exc)
            (self.may_pass.add if may_pass(exc) else self.may_pass.discard)(series)
        except Exception as exc:
            # A disk or database fault in a background fetch must not end the mount:
            # the readers fetch what they need one by one.
            log.error("series fetch of %s failed: %s: %s", series, type(exc).__name__, exc)
            self.failed[series] = f"{type(exc).__name__}: {exc}"
        finally:
            self.holds.let_go_series(series)
            self.in_flight.pop(series, None)
            del self.tasks[series]
            done.set()

    def _streams_series(self) -> bool:
        """Whether the source sends a whole series as one stream; else its files come one
        by one, as many at once as the caps allow."""
        source = self.fetcher.source
        return source is not None and source.capabilities.series_streams

    # -- the ZIP -------------------------------------------------------------------------

    async def _download_whole(self, collection: str, series: str) -> list[str] | None:
        """Fetch the series' ZIP; None once done. When every attempt was cut short, the
        files the series lists instead, so that those it lacks come one by one.

        Some servers cut large ZIPs, and a link may drop more often than a ZIP lasts:
        there, no number of attempts brings the whole ZIP, while single files, each lost
        alone, always end. The files it brings are not confirmed by MD5 (the list ends
        the ZIP); the ZIP's entries were checked against their CRCs.
        """
        try:
            await self.fetcher.with_attempts(f"series {series}", self._download_series,
                                             collection, series)
            return None
        except FetchFailed as exc:
            # Cut on the way, or closed early by the service (a ZIP that lacks files).
            if not isinstance(exc.__cause__, (TruncatedStream, ShortSeries)):
                raise
            listed = await self._listing(series)
            if not listed:
                raise
            log.warning("series %s: its ZIP was cut short at each of %d attempts (%s); "
                        "fetching the files it lacks one by one, which no MD5 list "
                        "confirms", series, self.fetcher.attempts, exc.__cause__)
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

    async def _download_series(self, collection: str, series: str, *,
                               fresh: bool = False) -> None:
        source = self.fetcher.source
        assert source is not None
        progress = self.in_flight[series] = [0, 0]
        revision = self.fetcher.revision[series]
        names: dict[str, tuple[str, str]] = {}  # entry name → (sop, md5)
        fresh = fresh or series in self.fetcher.revised
        zip_progress = ZipProgress()
        failed: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            if self.connections.per_series > 1:
                nursery.start_soon(self._singles, collection, series, zip_progress)
            try:
                # Each file is hashed as stored, when it is published: not by the ZIP
                # reader.
                async with self.connections.mount, source.open_series(
                        collection, series, hash_entries=False, fresh=fresh) as stream:
                    await self._read_zip(stream, collection, series, revision, names,
                                         progress, zip_progress)
                    expected = stream.md5s
            except BaseException as exc:  # raised below as itself, not in a group
                failed.append(exc)
            finally:
                zip_progress.finish()
            if not failed:
                # The ZIP brought every file, those of singles still under way too: they
                # would only hold up its MD5 list.
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        self.fetcher.check_revision(series, revision)  # the list may be of the new bytes
        self.stats.series_fetches += 1
        if fresh:
            self.fetcher.revised.discard(series)
        received = [sop for sop, _ in names.values()]
        listed = await self._closed_early(series, source.capabilities.series_checksums,
                                          names, expected)
        bad = self._confirm_md5s(series, names, expected)
        if bad:
            if self.on_refused is not None:
                for sop in bad:
                    await self.on_refused(sop)
            if stream.from_shared_cache and not fresh:
                # The site cache's stored ZIP may be what is damaged: fetch it past the
                # cache, which replaces its copy (the files that were right are kept).
                raise BadCopy(f"series {series}: {len(bad)} files of the site cache's "
                              "copy of its ZIP fail the MD5 list")
            await self._fetch_again(collection, series, bad)
        self._complete_if_kept(series, collection, listed or received)

    async def _read_zip(self, stream: SeriesStream, collection: str, series: str,
                        revision: int, names: dict[str, tuple[str, str]],
                        progress: list[int], zip_progress: ZipProgress) -> None:
        """Store each entry of the ZIP that the cache lacks.

        An entry whose single is under way is stored all the same: its bytes come with
        the ZIP anyway, and should that single fail (damaged at the source), the ZIP's
        copy is the one kept. Whichever is published first is served.
        """
        # The head tells which file an entry is before it is written: needed to skip one
        # the cache holds, and to keep the singles off the one being written.
        partly_cached = self.contents.series_files[series] > 0
        async with ZipBatch(self.fetcher, collection, series, revision, names,
                            zip_progress) as batch:
            async for member in stream.members():
                if batch.due():
                    await batch.flush()
                blocks = member.chunks()
                look = partly_cached or zip_progress.look
                head = await _head_of(blocks) if look else []
                sop = sop_in_head(head) if head else None  # None: header past the head
                known = self._cached_copy(sop)
                if known is None:
                    batch.claim(sop)
                    tmp = await batch.new_file()
                    await self._write(tmp, head, blocks, progress)
                    batch.add(member.name, tmp, sop)
                else:  # not written again, but its CRC is still checked
                    progress[0] += sum(map(len, head))
                    async for block in blocks:
                        progress[0] += len(block)
                    names[member.name] = known
                progress[1] += 1
                zip_progress.entry_done()
            await batch.flush()

    async def _singles(self, collection: str, series: str, zip_progress: ZipProgress) -> None:
        """Single images beside the series' ZIP (cache/parallel.py)."""
        source = self.fetcher.source
        if source is None or not source.capabilities.instance_checksums:
            return  # a single could not be checked before a reader sees it
        while not zip_progress.long_enough():
            await zip_progress.pause(LOOK_EVERY / 10)
        listed = self.held_instances_of(series) if self.held_instances_of else None
        if not listed or zip_progress.done:
            return
        singles = self.singles[series] = Singles(self.fetcher, self.contents,
                                                 self.connections, collection, series,
                                                 listed, zip_progress)
        try:
            await singles.run()
        finally:
            self.singles.pop(series, None)

    async def _closed_early(self, series: str, checksums: bool,
                            names: dict[str, tuple[str, str]], expected: dict[str, str]
                            ) -> list[str] | None:
        """Raise ShortSeries when a series stream ended well formed but without all its
        files: what NBIA sends when it fails mid-stream (it closes the ZIP properly, with
        status 200), and what a site cache then keeps as good. Returns the files the
        series lists when they had to be asked for.

        A source that lists checksums sends them last, for every file: a missing list or
        a listed file that never came tells, with no request. Another source's stream is
        held to the series' listing.
        """
        if checksums:
            if expected and set(expected) <= set(names):
                return None
            raise ShortSeries(f"series {series}: its ZIP ended after {len(names)} files "
                              + ("without the MD5 list" if not expected else
                                 f"of the {len(expected)} its MD5 list names"))
        listed = await self._listing(series)
        received = {sop for sop, _ in names.values()}
        if listed and not received.issuperset(listed):
            raise ShortSeries(f"series {series}: its stream brought {len(received)} of "
                              f"the {len(listed)} files it lists")
        return listed

    @staticmethod
    async def _write(tmp: TmpFile, head: list[bytes], blocks: AsyncIterator[bytes],
                     progress: list[int]) -> None:
        """Write one ZIP entry to a file in tmp/, to be published with its batch."""
        for block in head:
            await tmp.write(block)
        progress[0] += tmp.size
        async for block in blocks:
            await tmp.write(block)
            progress[0] += len(block)

    def _cached_copy(self, sop: str | None) -> tuple[str, str] | None:
        """The SOP UID and stored MD5 of the instance, when the cache holds it already:
        the ZIP's copy need not be written again."""
        if sop is None or sop not in self.contents.files or sop in self.contents.stale:
            return None
        md5 = self.index.md5(sop)
        return (sop, md5) if md5 is not None else None

    def _complete_if_kept(self, series: str, collection: str, sops: list[str]) -> bool:
        """Mark the series complete, unless some of its files went before the rest came:
        evicted to make room for them (nothing else could go), or dropped as damaged on
        disk meanwhile. A prefetch job then reports it as lost, and a read fetches those
        files again."""
        gone = sum(sop not in self.contents.files for sop in sops)
        if gone:
            log.warning("series %s: %d of its %d files went before the rest came: evicted, "
                        "as the cache cannot hold it beside the data in use, or dropped",
                        series, gone, len(sops))
            return False
        self.contents.mark_complete(series, collection)
        return True

    # -- a partly cached series ----------------------------------------------------------

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
        if not self.contents.series_files[series]:
            return None
        listed = await self._listing(series)
        if not listed:
            return None
        confirmed = set(self.index.files_of(series, verified=True))
        missing = [sop for sop in listed if sop not in self.contents.files]
        if len(missing) * RESUME_SHARE > len(listed) or not confirmed.issuperset(listed):
            return None
        return listed

    async def _download_missing(self, collection: str, series: str,
                                listed: list[str]) -> bool:
        """Complete a series file by file, a few files at once; whether it is complete."""
        missing = [sop for sop in listed if sop not in self.contents.files]
        if missing:
            log.info("series %s: fetching its %d missing files one by one", series,
                     len(missing))
        progress = self.in_flight[series] = [0, 0]
        revision = self.fetcher.revision[series]
        todo = iter(missing)
        failed: list[FetchFailed] = []
        fatal: list[Exception] = []  # the cache itself cannot take more: stop at once

        async def worker(scope: trio.CancelScope) -> None:
            for sop in todo:
                try:
                    await self.fetcher.fetch_one(collection, series, sop)
                except FetchFailed as exc:
                    failed.append(exc)
                    continue
                except (CacheFull, CacheDiskError) as exc:
                    fatal.append(exc)
                    scope.cancel()
                    return
                progress[0] += self.contents.sizes.get(sop, 0)
                progress[1] += 1

        async def capped_worker(scope: trio.CancelScope) -> None:
            async with self.connections.mount:  # each worker holds one of the mount's
                await worker(scope)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.connections.per_series, len(missing))):
                nursery.start_soon(capped_worker, nursery.cancel_scope)
        if fatal:
            raise fatal[0]
        if failed:
            raise FetchFailed(f"{len(failed)} of the {len(missing)} missing files of series "
                              f"{series} could not be fetched; the first: {failed[0]}"
                              ) from failed[0]
        self.fetcher.check_revision(series, revision)
        return self._complete_if_kept(series, collection, listed)

    # -- the service's MD5 list ----------------------------------------------------------

    def _confirm_md5s(self, series: str, names: dict[str, tuple[str, str]],
                      expected: dict[str, str]) -> dict[str, str | None]:
        """Mark the files that match the service's MD5 list verified; remove the others
        and return them, each with the MD5 the list gives (None: not listed)."""
        if not expected:
            return {}
        bad: dict[str, str | None] = {}
        for name, (sop, got) in names.items():
            want = expected.get(name)
            if want is not None and want == got and self.index.md5(sop) == got:
                self.index.confirm(sop)
            else:
                bad[sop] = want
        self.stats.md5_mismatches += len(bad)
        for sop, want in bad.items():
            if sop in self.contents.files:
                self.drop(sop)  # unlinked: no new open sees it
            if want is not None:
                self.fetcher.service_md5.setdefault(series, {})[sop] = want
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
            if in_a_row >= REFETCH_IN_A_ROW:
                failed.append(sop)  # the service's own copies are bad: readers find out
                continue
            log.info("series %s: fetching %s again after an MD5 mismatch", series, sop)
            try:
                # A reader may be fetching it already: then that fetch counts.
                await self.fetcher.fetch_or_join(collection, series, sop)
                in_a_row = 0
            except FetchFailed as exc:
                log.warning("%s", exc)
                failed.append(sop)
                in_a_row += 1
        if failed:
            raise IntegrityError(f"{len(failed)} of the {len(bad)} files of series {series} "
                                 "that failed the service's MD5 check failed it again, "
                                 "fetched one by one; they are not served")


class ZipBatch:
    """A series ZIP's finished entries, published a few at a time: one worker-thread job
    fsyncs them all, then each is renamed and indexed (docs/design/cache.md, "Life of a
    file"). The hand-off of each file to a thread and back cost the event loop more than
    the fsync itself.

    A batch is published once it holds BATCH_FILES files, once its first has waited
    BATCH_SECONDS, when a reader waits for one of its files, when a download waits for
    the room it holds, and at the ZIP's end.
    """

    def __init__(self, fetcher: Fetcher, collection: str, series: str, revision: int,
                 names: dict[str, tuple[str, str]], zip_progress: ZipProgress) -> None:
        self.fetcher = fetcher
        self.collection = collection
        self.series = series
        self.revision = revision
        self.names = names  # entry name → (sop, md5), filled as files are published
        self.zip = zip_progress
        self._files = contextlib.AsyncExitStack()  # the downloads not yet published
        self._pending: list[tuple[str, TmpFile]] = []  # (entry name, its file)
        self._claimed: list[str] = []  # SOP UIDs kept from the singles until published
        self._since = 0.0

    async def __aenter__(self) -> ZipBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None,
                        tb: object) -> None:
        if isinstance(exc, Exception) and self._pending:
            # A ZIP cut short (or closed early): the entries it brought whole, each
            # through its CRC, are kept as if each had been published alone; only the
            # one it was writing is lost. Cancellation publishes nothing.
            try:
                await self.flush()
            except Exception as failed:  # the ZIP's own error is the one to report
                log.warning("series %s: the files a cut ZIP brought could not be kept: %s",
                            self.series, failed)
        self._let_go()
        await self._files.aclose()  # what was not published is deleted

    def claim(self, sop: str | None) -> None:
        """Keep the singles beside the ZIP off a file it is about to write."""
        if sop is not None:
            self.zip.writing.add(sop)
            self._claimed.append(sop)

    async def new_file(self) -> TmpFile:
        return await self._files.enter_async_context(self.fetcher.download(self.series))

    def add(self, name: str, tmp: TmpFile, sop: str | None) -> None:
        if not self._pending:
            self._since = time.monotonic()
        if sop is None:  # named now, so that a reader waiting for it is seen (`due`)
            sop = tmp.sop_from_head()
            self.claim(sop)
        tmp.sop = sop
        tmp.room.written = True  # it frees no room until the batch is published
        self._pending.append((name, tmp))

    def due(self) -> bool:
        return bool(self._pending) and (
            len(self._pending) >= BATCH_FILES
            or time.monotonic() - self._since >= BATCH_SECONDS
            or any(self.fetcher.awaited(tmp.sop or "") for _, tmp in self._pending)
            or self.fetcher.space.wanted())

    async def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            published = await self.fetcher.publish_all(
                [tmp for _, tmp in pending], self.collection, self.series, self.revision)
            for (name, _), known in zip(pending, published, strict=True):
                self.names[name] = known
        self._let_go()
        files, self._files = self._files, contextlib.AsyncExitStack()
        await files.aclose()  # each is adopted by the cache now, or a duplicate

    def _let_go(self) -> None:
        for sop in self._claimed:
            self.zip.writing.discard(sop)
        self._claimed.clear()


class ShortSeries(BadCopy):
    """A series ZIP that came whole but lacks files the series lists."""


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
