"""Feeding the kernel's page cache from the disk cache, ahead of the reader.

A read that reaches the daemon costs a round trip through Python for every 128 KiB,
while a file handed to the kernel whole (notify_store) is then read at page-cache
speed. Tools read a series file after file, so when one file is opened the next few
are pushed by a worker thread, and the reader's next open finds its file in place.

The kernel locks a page while it waits for the daemon to fill it, and notify_store
takes the same lock. A push therefore only ever goes to an inode without an open
handle, and an open of an inode being pushed waits for the push to end before its
handle exists: no read can then be waiting on the daemon for those pages.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import queue
import threading

import cachetools
import pyfuse3
import trio

from tciafs.cache import Cache, Entry
from tciafs.catalog import Kind, Node
from tciafs.tree import Tree

log = logging.getLogger(__name__)

PUSH_LIMIT = 8 << 20  # larger files are read through the daemon, 128 KiB at a time
AHEAD_FILES = 8
AHEAD_BYTES = 32 << 20


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    TAKEN = enum.auto()  # an open came first and pushes the file itself
    PUSHED = enum.auto()
    FAILED = enum.auto()


class _Job:
    __slots__ = ("ino", "entry", "state", "lock", "waited", "done", "forgotten")

    def __init__(self, ino: int, entry: Entry) -> None:
        self.ino = ino
        self.entry = entry
        self.state = _State.QUEUED
        self.lock = threading.Lock()  # the worker and an open race for a queued job
        self.waited = False  # an open waits for the push: the worker must wake it
        self.done = trio.Event()
        self.forgotten = False  # the kernel dropped the inode meanwhile: the pages are gone


class PageFeeder:
    def __init__(self, tree: Tree, cache: Cache, *, ahead_files: int = AHEAD_FILES) -> None:
        self.tree = tree
        self.cache = cache
        self.ahead_files = ahead_files
        # Inodes whose pages the kernel holds; forget() and a failed push take them out,
        # and should the kernel drop pages on its own, reads simply reach the daemon.
        self._pushed: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=100_000)
        self._jobs: dict[int, _Job] = {}  # pushes queued or under way, by inode
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._finished: collections.deque[_Job] = collections.deque()
        self._queued = trio.Event()
        self.counters = {"pushed_at_open": 0, "pushed_ahead": 0, "waited": 0, "failed": 0,
                         "reads_through_daemon": 0}

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the worker thread; runs until cancelled, and leaves no push behind.

        The worker must be gone before the FUSE session is: a push into a closed
        session would touch freed memory.
        """
        self._token = trio.lowlevel.current_trio_token()
        worker = threading.Thread(target=self._work, name="tciafs-pages", daemon=True)
        worker.start()
        task_status.started()
        try:
            while True:  # finished pushes are otherwise settled at the next open
                if self._jobs:
                    await trio.sleep(1)
                else:
                    self._queued = trio.Event()
                    await self._queued.wait()
                self._reap()
        finally:
            self._token = None
            self._queue.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(worker.join)

    async def opened(self, node: Node, entry: Entry) -> None:
        """Called by open() before it hands out its handle."""
        self._reap()
        job = self._jobs.get(node.ino)
        if job is not None:
            await self._settle(job)
        first_handle = self.cache.open_count(node.ident) == 1
        if (node.ino not in self._pushed and first_handle and entry.size <= PUSH_LIMIT
                and _store_file(node.ino, entry.path, entry.size)):
            # The reader waits for this file anyway: no thread hop.
            self._pushed[node.ino] = True
            self.counters["pushed_at_open"] += 1
        self._queue_after(node)

    def forgotten(self, ino: int) -> None:
        """The kernel dropped the inode, and its pages with it."""
        self._pushed.pop(ino, None)
        job = self._jobs.get(ino)
        if job is not None:
            job.forgotten = True

    async def _settle(self, job: _Job) -> None:
        with job.lock:
            state = job.state
            if state is _State.QUEUED:
                job.state = _State.TAKEN
            elif state is _State.RUNNING:
                job.waited = True
        if state is _State.QUEUED:
            self._end(job)
        elif state is _State.RUNNING:
            self.counters["waited"] += 1
            await job.done.wait()
        self._reap()

    def _queue_after(self, node: Node) -> None:
        if self._token is None or not self.ahead_files:
            return
        budget = AHEAD_BYTES
        for sibling in self.tree.following(node, self.ahead_files):
            if (sibling.kind is not Kind.INSTANCE or sibling.ino in self._pushed
                    or sibling.ino in self._jobs or self.cache.open_count(sibling.ident)):
                continue
            entry = self.cache.hold(sibling.series_uid, sibling.ident)
            if entry is None:
                return  # not cached yet: the series fetch is behind the reader
            if entry.size > PUSH_LIMIT:
                self.cache.release(entry)
                continue
            job = self._jobs[sibling.ino] = _Job(sibling.ino, entry)
            self._queue.put(job)
            self._queued.set()
            budget -= entry.size
            if budget <= 0:
                return

    def _work(self) -> None:
        # Finished jobs go back through a plain deque, read at the next open: waking
        # the event loop for each would cost the loop more than the push saves.
        while (job := self._queue.get()) is not None:
            with job.lock:
                if job.state is not _State.QUEUED:
                    continue
                job.state = _State.RUNNING
            # After a stop, what is left in the queue is only marked failed.
            pushed = self._token is not None and _store_file(job.ino, job.entry.path,
                                                             job.entry.size)
            with job.lock:
                job.state = _State.PUSHED if pushed else _State.FAILED
                waited = job.waited
            self._finished.append(job)
            token = self._token
            if waited and token is not None:
                try:
                    token.run_sync_soon(job.done.set)
                except trio.RunFinishedError:
                    return

    def _reap(self) -> None:
        while self._finished:
            job = self._finished.popleft()
            if job.state is _State.PUSHED and not job.forgotten:
                self._pushed[job.ino] = True
                self.counters["pushed_ahead"] += 1
            else:
                self.counters["failed"] += 1
            self._end(job)

    def _end(self, job: _Job) -> None:
        del self._jobs[job.ino]
        self.cache.release(job.entry)


def _store_file(ino: int, path: str, size: int) -> bool:
    """Hand a whole cache file to the kernel; False if it would not take it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            pyfuse3.notify_store(ino, 0, os.pread(fd, size, 0))
        finally:
            os.close(fd)
    except OSError as exc:  # ENOENT: the kernel has forgotten the inode
        log.debug("page-cache push of inode %d: %s", ino, exc)
        return False
    except Exception:  # a push is only ever a shortcut: never fail an open for it
        log.exception("page-cache push of inode %d", ino)
        return False
    return True
