"""Objects read by byte range: blocks kept beside whole files, under the same bound, the
same LRU and the same crash safety (docs/design/cache.md, "Blocks").

A source that takes byte ranges (`Capabilities.ranges`: IDC) and lists exact sizes lets
an open return at once, without a byte: each read then fetches only the blocks it
covers, one ranged GET per run of missing blocks. A header scan (pydicom
`stop_before_pixels`, gdcmscanner) so fetches the 16 KiB block 0 of each file, not the
file, and the headers of the next files of the directory come ahead of the reader.

- An object read on in order, past its first IN_ORDER blocks, is being copied: it is
  fetched whole as any other file (single flight with the series fetch it also starts).
- When every block of an object is present, the blocks are joined into a whole file,
  published as a download would be; blocks of an object present whole are dropped.
- An object larger than `whole_limit` (slide microscopy, multi-frame: GBs) is only ever
  read in blocks; a read in order fetches RUN_AHEAD blocks at once.

Objects never change (IDC: a new version is a new key), so a block never goes stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from tciafs.sources import lanes

from .contents import Contents, Holds
from .fetch import Fetcher
from .index import Index
from .layout import block_path
from .model import BadCopy, CacheStats, Entry, FetchFailed
from .space import Space
from .store import Store

log = logging.getLogger("tciafs.cache")

# The kernel asks FUSE for at most 128 KiB at a time (its read-ahead window and the
# default max_read): one kernel read is one block and at most one GET. A smaller block
# fetches no less (the kernel wants the whole window) in more requests; a larger one
# fetches more than a header read asks for.
BLOCK = 128 << 10
# Block 0 is smaller: a file read by blocks tells readers an I/O size of HEADER_IO
# (st_blksize), so a header reader's first read is 8 KiB, which the kernel's first
# read-ahead window turns into 16 KiB from offset 0: exactly block 0. Block i > 0 holds
# FIRST + (i - 1) * BLOCK onwards, 128 KiB windows from there.
FIRST = 16 << 10
HEADER_IO = 8 << 10
WHOLE_LIMIT = 64 << 20  # larger objects are read in blocks, never whole
IN_ORDER = 2  # a read that follows this many blocks read in order fetches the object whole
RUN_AHEAD = 32  # blocks one GET brings for an in-order read of a large object (4 MiB)
# Headers ahead. A header read (block 0) is a guess that the next files' headers follow:
# a header scan waits out one round trip per file unless they are in flight already.
# - A first header read of a directory fetches block 0 of the next HEADERS_FIRST files,
#   that many at once: cheap when wrong (16 KiB a file), a viewer may open only one.
# - Once two files in a row had their header read (a scan), block 0 of the next
#   HEADERS_AHEAD files is asked for, in order, HEADERS_SCAN_AT_ONCE at once; each
#   header read moves the window on. A scan then goes at the pace of the reader, not the
#   link: 200 headers at 50 ms a round trip take 0.4 s at 24 at once. Bench figure 12b:
#   6 at once within 8 connections took 0.54 to 0.59 of a cold copy, this rule 0.21 to
#   0.31, near its time with no latency at all; 48 at once was no faster.
# The guesses ride the source's lane for them (tciafs.sources.lanes; IDC's is
# AHEAD_CONNECTIONS = 24 connections of its own), so a reader's request never waits
# behind one. Each header is asked for once: a reader that wants one still queued
# fetches it itself, and the guess, when its turn comes, finds it here.
HEADERS_FIRST = 4
HEADERS_AHEAD = 64
HEADERS_SCAN_AT_ONCE = 24


def block_key(sop: str, idx: int) -> str:
    """A block's key in `Contents.files`, the LRU that whole files and blocks share. It
    starts with a NUL, which no SOP Instance UID or object name holds: no collision."""
    return f"\0{idx}\0{sop}"


def parse_key(key: str) -> tuple[str, int] | None:
    """The object and index of a block key; None for a whole file's key."""
    if not key.startswith("\0"):
        return None
    _, idx, sop = key.split("\0", 2)
    return sop, int(idx)


@dataclass(frozen=True, slots=True)
class Opened:
    """An object a reader opened to read by blocks: what fetching its blocks needs."""

    collection: str
    series: str
    size: int

    @property
    def count(self) -> int:
        return index_of(self.size - 1) + 1

    def block_size(self, idx: int) -> int:
        return min(start_of(idx + 1), self.size) - start_of(idx)


def start_of(idx: int) -> int:
    """Where block `idx` starts in its object."""
    return 0 if idx == 0 else FIRST + (idx - 1) * BLOCK


def index_of(offset: int) -> int:
    """The block that holds byte `offset`."""
    return 0 if offset < FIRST else 1 + (offset - FIRST) // BLOCK


class Blocks:
    def __init__(self, store: Store, space: Space, index: Index, contents: Contents,
                 holds: Holds, fetcher: Fetcher, stats: CacheStats, *, whole_limit: int,
                 start_series: Callable[[str, str], None],
                 series_fetching: Callable[[str], bool]) -> None:
        """`start_series` starts the series fetch of a series read in order (when the
        cache wants it); `series_fetching` tells whether one is under way."""
        self.store = store
        self.space = space
        self.index = index
        self.contents = contents
        self.holds = holds
        self.fetcher = fetcher
        self.stats = stats
        self.whole_limit = whole_limit
        self.start_series = start_series
        self.series_fetching = series_fetching
        self.objects: dict[str, Opened] = {}  # objects opened by block, by name
        self.present: dict[str, set[int]] = {}  # object → indices of its present blocks
        self._fetching: dict[tuple[str, int], trio.Event] = {}  # single flight per block
        self._joining: set[str] = set()  # objects whose blocks are being joined
        # The next files of each opened object's directory (name, size), for headers ahead.
        self._next: dict[str, list[tuple[str, int | None]]] = {}
        self.nursery: trio.Nursery | None = None  # set while Cache.run runs
        # Headers to fetch ahead, in the order a scan reads them, and the workers on them.
        self._ahead: deque[tuple[Opened, str]] = deque()
        self._queued: set[str] = set()  # the objects in _ahead
        self._workers = 0
        # Per series: the file a header read expects next (the one after the last read).
        self._expected: dict[str, str] = {}

    @property
    def count(self) -> int:
        """Blocks present."""
        return sum(map(len, self.present.values()))

    def takes(self, size: int | None) -> bool:
        """Whether an object of this size (None: unknown) is read by blocks."""
        source = self.fetcher.source
        return bool(size) and source is not None and source.capabilities.ranges

    def opened(self, collection: str, series: str, sop: str, size: int,
               following: list[tuple[str, int | None]]) -> None:
        """`following`: the files after it in its directory, in `ls` order, with sizes."""
        self.objects[sop] = Opened(collection, series, size)
        self._next[sop] = following

    def closed(self, sop: str) -> None:
        """The last reader let go of an object read by blocks."""
        self.objects.pop(sop, None)
        self._next.pop(sop, None)

    # -- start-up ------------------------------------------------------------------------

    def reconcile(self) -> None:
        """As Store.reconcile does for whole files (tmp/ is emptied there): delete the
        block files the index does not list, forget the rows whose file is missing or of
        another size, and those of objects present whole. Then count the rest."""
        top = self.store.root / "blocks"  # made by the first block: NBIA never has one
        on_disk = {p.name: p for p in top.glob("*/*")}
        lost: list[tuple[str, int]] = []
        for sop, idx, _series, size in self.index.blocks():
            path = on_disk.pop(block_path(self.store.root, sop, idx).name, None)
            if path is None or path.stat().st_size != size or sop in self.contents.files:
                lost.append((sop, idx))
                if path is not None:
                    path.unlink()
                continue
            self._add(sop, idx, size)
            self.space.count(size)
        for orphan in on_disk.values():
            orphan.unlink()
        if lost:
            self.index.delete_blocks(lost)
        if top.is_dir():
            for directory in (top, *top.iterdir()):
                self.space.measure_dir(directory)

    # -- reading -------------------------------------------------------------------------

    async def read(self, entry: Entry, off: int, size: int) -> bytes:
        """Bytes `off` to `off + size` of an object opened by blocks, fetching the blocks
        they lie in (or the whole object, read in order) that are not here yet."""
        sop = entry.sop
        opened = self.objects[sop]
        end = min(off + size, opened.size)
        if off >= end:
            return b""
        for _ in range(self.fetcher.attempts + 1):  # blocks may go between the awaits
            if sop in self.contents.files:  # whole: the reader's hold keeps it here
                return _pread(entry.path, off, end - off)
            first, last = index_of(off), index_of(end - 1)
            small = opened.size <= self.whole_limit
            in_order = first > 0 and all(i in self.present.get(sop, ())
                                         for i in range(max(0, first - IN_ORDER), first))
            if small and ((in_order and first >= IN_ORDER) or self.series_fetching(opened.series)):
                await self._whole(opened, sop)
                continue
            if in_order and not small:
                last = min(opened.count - 1, last + RUN_AHEAD)
            if first == 0:
                self._headers_ahead(opened, sop)
            data = await self._read_blocks(opened, sop, off, end, range(first, last + 1))
            if data is not None:
                if small and len(self.present.get(sop, ())) == opened.count:
                    await self._join(opened, sop)
                return data
        raise FetchFailed(f"instance {sop}: its blocks kept going before they were read")

    async def _read_blocks(self, opened: Opened, sop: str, off: int, end: int,
                           wanted: range) -> bytes | None:
        """The bytes from the blocks `wanted`, held against eviction while they come;
        None when one went meanwhile (its object became whole)."""
        keys = [block_key(sop, i) for i in wanted]
        self.holds.take_keys(keys)
        try:
            await self._ensure(opened, sop, wanted)
            return self._from_blocks(sop, off, end)
        finally:
            self.holds.let_go_keys(keys)

    def _from_blocks(self, sop: str, off: int, end: int) -> bytes | None:
        parts: list[bytes] = []
        pos = off
        while pos < end:
            idx = index_of(pos)
            key = block_key(sop, idx)
            if key not in self.contents.files:
                return None
            wanted = min(end, start_of(idx + 1)) - pos
            data = _pread(str(block_path(self.store.root, sop, idx)), pos - start_of(idx),
                          wanted)
            if len(data) != wanted:  # harmed from outside: fetch it again
                self.drop(key)
                return None
            self.contents.files.move_to_end(key)
            parts.append(data)
            pos += wanted
        return b"".join(parts)

    async def _ensure(self, opened: Opened, sop: str, wanted: range) -> None:
        """Make the blocks present: each run of missing ones in one ranged GET; a block
        another task fetches is waited for (single flight)."""
        while sop not in self.contents.files:  # whole meanwhile: the caller reads that
            missing = [i for i in wanted if block_key(sop, i) not in self.contents.files]
            if not missing:
                return
            free = [i for i in missing if (sop, i) not in self._fetching]
            if not free:
                await self._fetching[(sop, missing[0])].wait()
                continue
            run_end = free[0]
            while run_end + 1 in free:
                run_end += 1
            await self._fetch_run(opened, sop, free[0], run_end)

    def _headers_ahead(self, opened: Opened, sop: str) -> None:
        """Queue block 0 of the next files of the directory, to be fetched in the
        background: HEADERS_FIRST of them, or HEADERS_AHEAD once a scan is seen."""
        if self.nursery is None:
            return
        following = self._next.pop(sop, None)
        if following is None:  # read before: the window moved on when it was
            return
        scanning = self._expected.get(opened.series) == sop
        if following:
            self._expected[opened.series] = following[0][0]
        for name, size in following[:HEADERS_AHEAD if scanning else HEADERS_FIRST]:
            if size and name not in self._queued and not self._has_header(name):
                self._queued.add(name)
                self._ahead.append((Opened(opened.collection, opened.series, size), name))
        at_once = HEADERS_SCAN_AT_ONCE if scanning else HEADERS_FIRST
        while self._workers < min(at_once, len(self._ahead)):
            self._workers += 1
            self.nursery.start_soon(self._fetch_ahead)

    def _has_header(self, sop: str) -> bool:
        return (sop in self.contents.files or (sop, 0) in self._fetching
                or block_key(sop, 0) in self.contents.files)

    async def _fetch_ahead(self) -> None:
        """One worker on the queue of headers ahead, first in first out, until it is
        empty: the workers' number is the number in flight."""
        try:
            with lanes.ahead():
                while self._ahead:
                    opened, sop = self._ahead.popleft()
                    self._queued.discard(sop)
                    if self._has_header(sop) or self.series_fetching(opened.series):
                        continue  # here, or coming whole with its series
                    try:
                        await self._fetch_run(opened, sop, 0, 0)
                    except Exception as exc:  # a guess: a reader that wants it asks again
                        log.debug("header of %s fetched ahead: %s", sop, exc)
        finally:
            self._workers -= 1

    async def _whole(self, opened: Opened, sop: str) -> None:
        """The object is read in order: fetch it whole, and start its series' fetch."""
        self.start_series(opened.collection, opened.series)
        await self.fetcher.fetch_one(opened.collection, opened.series, sop)

    # -- fetching ------------------------------------------------------------------------

    async def _fetch_run(self, opened: Opened, sop: str, first: int, last: int) -> None:
        # The run is entered as fetching before the first await: single flight.
        runs = {i: trio.Event() for i in range(first, last + 1)}
        for i, event in runs.items():
            self._fetching[(sop, i)] = event
        try:
            await self.fetcher.with_attempts(f"blocks {first}-{last} of instance {sop}",
                                             self._download_run, opened, sop, first, last)
        finally:
            for i, event in runs.items():
                del self._fetching[(sop, i)]
                event.set()

    async def _download_run(self, opened: Opened, sop: str, first: int, last: int, *,
                            fresh: bool = False) -> None:
        source = self.fetcher.source
        assert source is not None
        start, stop = start_of(first), min(start_of(last + 1), opened.size)
        revision = self.fetcher.revision[opened.series]
        idx = first
        pending = bytearray()
        async with source.open_instance(opened.collection, opened.series, sop,
                                        byte_range=(start, stop), fresh=fresh) as stream:
            async for chunk in stream.chunks():
                if sop in self.contents.files:
                    return  # it came whole meanwhile: its blocks are no more use
                pending += chunk
                # Each block is kept as it comes: a run cut short keeps its first blocks.
                while idx <= last and len(pending) >= opened.block_size(idx):
                    size = opened.block_size(idx)
                    await self._store(opened, sop, idx, bytes(pending[:size]), revision)
                    del pending[:size]
                    idx += 1
        if (idx <= last or pending) and sop not in self.contents.files:
            raise BadCopy(f"instance {sop}: bytes {start}-{stop} came "
                          f"{start_of(idx) - start + len(pending)} long")

    async def _store(self, opened: Opened, sop: str, idx: int, data: bytes,
                     revision: int) -> None:
        """Write one block as a whole file is written: reserved, written in tmp/, fsynced,
        renamed into blocks/, then its row, then in memory."""
        key = block_key(sop, idx)
        if key in self.contents.files or sop in self.contents.files:
            return
        final = block_path(self.store.root, sop, idx)
        with self.space.reservation(opened.series, len(data)) as room:
            await room.claim(len(data))
            try:
                await self.store.put_block(data, final,
                                           lambda: room.make_room(len(data)))
                # From here no await: the checks, the row and memory change together.
                self.fetcher.check_revision(opened.series, revision)
                if key in self.contents.files:  # stored meanwhile: the same bytes, its file
                    room.give_back()
                    return
                if sop in self.contents.files:  # came whole meanwhile: no block is kept
                    room.give_back()
                    _remove(final)
                    return
                # The file before its row, as for whole files.
                self.index.add_block(sop, idx, opened.series, len(data),
                                     make_room=lambda: self.space.evict(1, opened.series))
            except BaseException:
                if room.reserved:  # not given back above: no row names the file
                    room.give_back()
                    _remove(final)
                raise
        self.space.measure_dir(final.parent)
        if not self.space.knows_dir(final.parent.parent):  # the first block made blocks/
            self.space.measure_dir(final.parent.parent)
        self._add(sop, idx, len(data))
        self.stats.bytes_fetched += len(data)

    def _add(self, sop: str, idx: int, size: int) -> None:
        self.contents.files[block_key(sop, idx)] = size  # the most recently used
        self.present.setdefault(sop, set()).add(idx)

    # -- joining, dropping ---------------------------------------------------------------

    async def _join(self, opened: Opened, sop: str) -> None:
        """Every block of the object is here: make it a whole file, published as a
        download is (checked, fsynced, renamed, indexed); the blocks then go."""
        if sop in self._joining or sop in self.contents.files:
            return
        keys = [block_key(sop, i) for i in range(opened.count)]
        self._joining.add(sop)
        self.holds.take_keys(keys)
        revision = self.fetcher.revision[opened.series]
        try:
            async with self.fetcher.download(opened.series, expected=opened.size) as tmp:
                for i in range(opened.count):
                    await tmp.write(_read_all(block_path(self.store.root, sop, i)))
                await self.fetcher.publish(tmp, opened.collection, opened.series, revision,
                                           expect_sop=sop)
            self.stats.bytes_fetched -= opened.size  # fetched already, as blocks
        except (FetchFailed, OSError) as exc:
            log.warning("instance %s: its blocks could not be joined (%s); kept as blocks",
                        sop, exc)
        finally:
            self.holds.let_go_keys(keys)
            self._joining.discard(sop)

    def whole_published(self, sop: str) -> None:
        """The object is present whole: its blocks are of no more use."""
        for idx in list(self.present.get(sop, ())):
            self.drop(block_key(sop, idx))

    def drop(self, key: str) -> None:
        """Take a block out: memory and room, its file, then its row (as Cache._drop)."""
        parsed = parse_key(key)
        assert parsed is not None
        sop, idx = parsed
        self.space.release(self.contents.remove(key))
        block_path(self.store.root, sop, idx).unlink(missing_ok=True)
        self.index.delete_blocks([(sop, idx)])
        held = self.present.get(sop)
        if held is not None:
            held.discard(idx)
            if not held:
                del self.present[sop]


def _pread(path: str | Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as stored:
        return stored.read()


def _remove(path: Path) -> None:
    """Delete a block file no row names; one left behind is an orphan the next start
    deletes."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
