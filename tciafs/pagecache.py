"""Feeding the kernel's page cache from the disk cache, ahead of the reader.

A read that reaches the daemon costs a round trip through Python for every 128 KiB,
while a file handed to the kernel whole (notify_store, tciafs.pagepush) is then read
at page-cache speed. The file being opened is pushed at once, as its reader waits for
it. Tools read a series file after file, so the next few files are queued, and the
event loop pushes them one per turn while the reader reads: on two CPUs the copy into
the page cache overlaps the reader's own copy out of it.

Every push runs on the event loop, and only into an inode that no handle holds open.
The kernel locks a page while a read of it waits for the daemon, and notify_store
takes the same lock: a push to an open file could wait on a read that only this loop
would answer. An inode nobody has open has no such read, so a push never waits on
the daemon, and no push outlives it. A cache file that is not in memory is first read
from disk by a worker thread, which touches only the disk cache, never FUSE.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os

import cachetools
import pyfuse3
import trio

from tciafs import pagepush
from tciafs.cache import Cache, Entry
from tciafs.catalog import Kind, Node
from tciafs.tree import Tree

log = logging.getLogger(__name__)

PUSH_LIMIT = 8 << 20  # larger files are read through the daemon, 128 KiB at a time
AHEAD_FILES = 4
AHEAD_BYTES = 32 << 20
MAX_QUEUED = 64  # many readers at once must not pin half the cache


class PageFeeder:
    def __init__(self, tree: Tree, cache: Cache, *, ahead_files: int = AHEAD_FILES) -> None:
        self.tree = tree
        self.cache = cache
        self.ahead_files = ahead_files
        # Inodes whose pages the kernel holds; forget() and a failed push take them out,
        # and should the kernel drop pages on its own, reads simply reach the daemon.
        self._pushed: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=100_000)
        # Files to push ahead, in the reader's order, each held against eviction.
        self._queue: dict[int, Entry] = {}
        self._queued_work = trio.Event()
        self._loading: dict[int, trio.Event] = {}  # files a worker thread reads from disk
        # The inode of each cached instance whose bytes the kernel may hold (opened or
        # pushed), until the kernel forgets the inode: to take back bytes found wrong.
        self._inode_of: dict[str, int] = {}
        self._sop_of: dict[int, str] = {}
        self._pusher: pagepush.Pusher | None = None
        self.state = "not started"
        self.counters = {"pushed_at_open": 0, "pushed_ahead": 0, "read_from_disk": 0,
                         "failed": 0, "reads_through_daemon": 0}

    async def run(self, *, pusher: pagepush.Pusher | None = None,
                  task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Push the queued files; runs until cancelled.

        Without a FUSE device of our own (an unmounted test) there is nothing to push
        into, and every read goes through the daemon.
        """
        if pusher is None:
            device = pagepush.fuse_device()
            if device is None:
                self.state = "off: no FUSE device"
                task_status.started()
                await trio.sleep_forever()
            pusher = pagepush.Pusher(device)
        self._pusher = pusher
        self.state = "running"
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._queued_work = trio.Event()
                    await self._queued_work.wait()
                    continue  # an open may have taken it back meanwhile
                ino = next(iter(self._queue))
                entry = self._queue.pop(ino)
                try:
                    if await self._push_when_closed(ino, entry):
                        self.counters["pushed_ahead"] += 1
                finally:
                    if self.cache.release(entry):  # stale: take back what was pushed
                        await self.refused(entry.sop)
                # One file per turn: an open that arrived meanwhile is answered first.
                await trio.lowlevel.checkpoint()
        finally:
            self.state = "stopped"
            for entry in self._queue.values():
                self.cache.release(entry)
            self._queue.clear()
            pusher.close()
            self._pusher = None

    async def opened(self, node: Node, entry: Entry) -> None:
        """Called by open() before it hands out its handle."""
        self._held_by_kernel(entry.sop, node.ino)
        queued = self._queue.pop(node.ino, None)
        if queued is not None:  # it is being opened: push it now, not later
            self.cache.release(queued)
        loading = self._loading.get(node.ino)
        if loading is not None:  # the feeder reads it from disk: then it is quick to push
            await loading.wait()
        if entry.size <= PUSH_LIMIT and await self._push_when_closed(node.ino, entry):
            self.counters["pushed_at_open"] += 1
        self._queue_after(node)

    def forgotten(self, ino: int) -> None:
        """The kernel dropped the inode, and its pages with it."""
        self._pages_dropped(ino)
        sop = self._sop_of.pop(ino, None)
        if sop is not None and self._inode_of.get(sop) == ino:  # not since listed anew
            del self._inode_of[sop]

    def _pages_dropped(self, ino: int) -> None:
        self._pushed.pop(ino, None)
        queued = self._queue.pop(ino, None)
        if queued is not None:  # not worth pushing now
            self.cache.release(queued)

    async def refused(self, sop: str) -> None:
        """The cache removed this instance's bytes as wrong: drop the kernel's copy too.

        A worker thread asks, as the kernel may wait on a locked page whose read only
        the event loop answers.
        """
        ino = self._inode_of.get(sop)
        if ino is not None:  # else never handed to the kernel
            await self.invalidate(ino)

    @property
    def reading_from_disk(self) -> bool:
        """Whether a worker thread is reading files into memory before their push."""
        return bool(self._loading)

    async def invalidate(self, ino: int) -> None:
        """Have the kernel drop the inode's pages and attributes (a no-op unmounted)."""
        if self._pusher is None:
            return
        # The kernel still knows the inode, and a reader that holds it open may read its
        # pages in again: keep its instance, so that the last release can drop them too.
        self._pages_dropped(ino)
        try:  # from a worker thread: see refused()
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
        except OSError as exc:  # ENOENT: the kernel forgot the inode meanwhile
            log.debug("invalidating inode %d: %s", ino, exc)

    def _held_by_kernel(self, sop: str, ino: int) -> None:
        self._inode_of[sop] = ino
        self._sop_of[ino] = sop

    async def _push_when_closed(self, ino: int, entry: Entry) -> bool:
        """Push a file that nobody has open but the caller; False if not pushed.

        The caller holds the file once: as queued, or as being opened (its handle is
        not handed out yet). Any further hold is an open handle.
        """
        if self._pusher is None or ino in self._pushed or self.cache.open_count(entry.sop) > 1:
            return False
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("page-cache push of %s: %s", entry.path, exc)
            self.counters["failed"] += 1
            return False
        try:
            if not pagepush.in_memory(fd, entry.size):
                await self._read_from_disk(ino, fd, entry.size)
                # Meanwhile a reader may have opened it, or the feeder stopped.
                if (self._pusher is None or ino in self._pushed
                        or self.cache.open_count(entry.sop) > 1):
                    return False
            self._pusher.push(ino, fd, entry.size)
        except OSError as exc:
            log.debug("page-cache push of inode %d: %s", ino, exc)
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel forgot the inode meanwhile
                self.counters["failed"] += 1
            return False
        finally:
            os.close(fd)
        self._pushed[ino] = True
        self._held_by_kernel(entry.sop, ino)
        return True

    async def _read_from_disk(self, ino: int, fd: int, size: int) -> None:
        done = self._loading[ino] = trio.Event()
        self._read_queued_soon()
        try:
            await trio.to_thread.run_sync(pagepush.read_through, fd, size)
            self.counters["read_from_disk"] += 1
        finally:
            del self._loading[ino]
            done.set()

    def _read_queued_soon(self) -> None:
        """The disk cache has gone cold: have the disk read the queued files meanwhile,
        not one after another as they come up (a no-op for pages already in memory)."""
        for entry in itertools.islice(self._queue.values(), self.ahead_files):
            with contextlib.suppress(OSError):
                pagepush.read_soon(entry.path, entry.size)

    def _queue_after(self, node: Node) -> None:
        if self._pusher is None:
            return
        budget = AHEAD_BYTES
        for sibling in self.tree.following(node, self.ahead_files):
            if len(self._queue) >= MAX_QUEUED or budget <= 0:
                return
            if (sibling.kind is not Kind.INSTANCE or sibling.ino in self._pushed
                    or sibling.ino in self._queue or self.cache.open_count(sibling.ident)):
                continue
            entry = self.cache.hold(sibling.series_uid, sibling.ident)
            if entry is None:
                return  # not cached yet: the series fetch is behind the reader
            if entry.size > PUSH_LIMIT:
                self.cache.release(entry)
                continue
            self._queue[sibling.ino] = entry
            budget -= entry.size
            self._queued_work.set()
