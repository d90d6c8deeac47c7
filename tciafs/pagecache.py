"""Feeding the kernel's page cache from the disk cache, ahead of the reader.

A read that reaches the daemon costs a round trip through Python for every 128 KiB,
while a file handed to the kernel whole (notify_store) is then read at page-cache
speed. Tools read a series file after file, so when one file is opened the next few
are pushed by a child process (tciafs.pagepush), and the reader's next open finds its
file in place. The file being opened is pushed here, at once: its reader waits for it.

The kernel locks a page while it waits for the daemon to fill it, and notify_store
takes the same lock. A push in this process therefore only ever goes to an inode with
no open handle. The child may block on such a lock without harm, as the daemon still
answers the read; an open of an inode the child is pushing waits for that push, since
its pages are about to be there, but only briefly (SETTLE_SECONDS).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import subprocess
import sys

import cachetools
import trio

from tciafs import pagepush
from tciafs.cache import Cache, Entry
from tciafs.catalog import Kind, Node
from tciafs.tree import Tree

log = logging.getLogger(__name__)

PUSH_LIMIT = 8 << 20  # larger files are read through the daemon, 128 KiB at a time
AHEAD_FILES = 8
AHEAD_BYTES = 32 << 20
# An open waits this long for the child's push of its file, then reads through the
# daemon: the child runs only on CPU time nobody else wants, and may be starved.
SETTLE_SECONDS = 0.1
MAX_IN_FLIGHT = 64  # many readers at once must not pin half the cache
BATCH_SECONDS = 0.25  # finished pushes nobody waits for are settled at most this often


class _Job:
    __slots__ = ("ino", "entry", "message", "done", "forgotten")

    def __init__(self, ino: int, entry: Entry) -> None:
        self.ino = ino
        self.entry = entry
        path = os.fsencode(entry.path)
        self.message = pagepush.JOB.pack(ino, entry.size, len(path)) + path
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
        self._jobs: dict[int, _Job] = {}  # pushes sent to the child, by inode
        self._in_flight: collections.deque[_Job] = collections.deque()  # in the child's order
        self._pusher: pagepush.Pusher | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._waiters = 0
        self._wanted = trio.Event()  # an open waits: collect the child's answers now
        self.state = "not started"
        self.counters = {"pushed_at_open": 0, "pushed_ahead": 0, "waited": 0,
                         "gave_up_waiting": 0, "failed": 0,
                         "reads_through_daemon": 0}

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the child that pushes ahead; runs until cancelled.

        Without a FUSE device of our own (an unmounted test) there is nothing to push
        into, and every read goes through the daemon.
        """
        device = pagepush.fuse_device()
        if device is None:
            self.state = "off: no FUSE device"
            task_status.started()
            await trio.sleep_forever()
        self._pusher = pagepush.Pusher(device)
        try:
            self._child = _start_child(device)
        except OSError as exc:
            log.warning("no read-ahead into the page cache: %s", exc)
            self.state = f"no read-ahead: {exc}"
        else:
            self.state = "starting"
        task_status.started()
        try:
            await self._collect()
        finally:
            self.state = "stopped"
            with trio.CancelScope(shield=True):
                await self._stop_child()
            self._pusher.close()
            self._pusher = None

    async def opened(self, node: Node, entry: Entry) -> None:
        """Called by open() before it hands out its handle."""
        self._settle_finished()
        job = self._jobs.get(node.ino)
        if job is not None and not await self._wait_for(job):
            return  # the child is stuck on this file: leave it to the daemon's reads
        first_handle = self.cache.open_count(node.ident) == 1
        if (node.ino not in self._pushed and first_handle and entry.size <= PUSH_LIMIT
                and self._push_here(node.ino, entry)):
            self._pushed[node.ino] = True
            self.counters["pushed_at_open"] += 1
        self._queue_after(node)

    def forgotten(self, ino: int) -> None:
        """The kernel dropped the inode, and its pages with it."""
        self._pushed.pop(ino, None)
        job = self._jobs.get(ino)
        if job is not None:
            job.forgotten = True

    def _push_here(self, ino: int, entry: Entry) -> bool:
        if self._pusher is None:
            return False
        try:
            self._pusher.push(ino, entry.path, entry.size)
        except OSError as exc:  # ENOENT: the kernel has forgotten the inode
            log.debug("page-cache push of inode %d: %s", ino, exc)
            return False
        return True

    async def _wait_for(self, job: _Job) -> bool:
        self.counters["waited"] += 1
        self._waiters += 1
        self._wanted.set()
        try:
            with trio.move_on_after(SETTLE_SECONDS):
                await job.done.wait()
                return True
        finally:
            self._waiters -= 1
        self.counters["gave_up_waiting"] += 1
        return False

    def _queue_after(self, node: Node) -> None:
        if self._child is None or len(self._in_flight) >= MAX_IN_FLIGHT:
            return
        following = self.tree.following(node, self.ahead_files)
        wanted = [sibling for sibling in following
                  if sibling.kind is Kind.INSTANCE and sibling.ino not in self._pushed
                  and sibling.ino not in self._jobs]
        # Topped up by half a window at a time, so that the child is woken once for
        # several files; near the end of the directory, with what is left.
        if not wanted or (len(wanted) < self.ahead_files // 2
                          and len(following) == self.ahead_files):
            return
        budget = AHEAD_BYTES
        jobs: list[_Job] = []
        message = b""
        for sibling in wanted:
            if self.cache.open_count(sibling.ident):
                continue
            entry = self.cache.hold(sibling.series_uid, sibling.ident)
            if entry is None:
                break  # not cached yet: the series fetch is behind the reader
            if entry.size > PUSH_LIMIT:
                self.cache.release(entry)
                continue
            job = _Job(sibling.ino, entry)
            if len(message) + len(job.message) > select.PIPE_BUF:
                self.cache.release(entry)
                break
            jobs.append(job)
            message += job.message
            budget -= entry.size
            if budget <= 0:
                break
        if jobs and self._send(message):
            for job in jobs:
                self._jobs[job.ino] = job
            self._in_flight.extend(jobs)
        else:
            for job in jobs:
                self.cache.release(job.entry)

    def _send(self, message: bytes) -> bool:
        assert self._child is not None and self._child.stdin is not None
        try:  # at most PIPE_BUF bytes: the pipe takes all of them or none
            return os.write(self._child.stdin.fileno(), message) == len(message)
        except BlockingIOError:  # the child is far behind: read ahead later
            return False
        except OSError as exc:  # EPIPE: the child is gone; _collect() will say so
            log.debug("page-cache job: %s", exc)
            return False

    async def _collect(self) -> None:
        """Settle the child's answers: at once for a waiting open, else in batches.

        Waking the event loop for every finished push would cost the loop more than
        the push saves the reader.
        """
        if self._child is None or self._child.stdout is None:
            await trio.sleep_forever()
        answers = self._child.stdout.fileno()
        await trio.lowlevel.wait_readable(answers)  # jobs sent meanwhile wait in the pipe
        if os.read(answers, 1) != pagepush.READY:
            self._child_lost()
            await trio.sleep_forever()
        self.state = "running"
        while True:
            await trio.lowlevel.wait_readable(answers)
            if not self._read_answers():
                self._child_lost()
                await trio.sleep_forever()
            if not self._waiters:
                self._wanted = trio.Event()
                with trio.move_on_after(BATCH_SECONDS):
                    await self._wanted.wait()

    def _settle_finished(self) -> None:
        if self._child is not None and self._in_flight and self.state == "running":
            self._read_answers()

    def _read_answers(self) -> bool:
        """Settle what the child has answered so far; False once it is gone."""
        assert self._child is not None and self._child.stdout is not None
        try:
            answers = os.read(self._child.stdout.fileno(), max(1, len(self._in_flight)))
        except BlockingIOError:
            return True
        for answer in answers[:len(self._in_flight)]:
            self._finish(self._in_flight.popleft(), answer == pagepush.OK[0])
        return bool(answers)

    def _finish(self, job: _Job, pushed: bool) -> None:
        del self._jobs[job.ino]
        self.cache.release(job.entry)
        if pushed and not job.forgotten:
            self._pushed[job.ino] = True
            self.counters["pushed_ahead"] += 1
        else:
            self.counters["failed"] += 1
        job.done.set()

    def _child_lost(self) -> None:
        code = self._child.poll() if self._child is not None else None
        log.warning("the page-cache pusher ended (exit status %s); reads of files not yet "
                    "pushed now go through the daemon", code)
        self.state = f"pusher ended with status {code}"
        self._abandon()

    def _abandon(self) -> None:
        while self._in_flight:
            self._finish(self._in_flight.popleft(), False)
        if self._child is not None and self._child.stdin is not None:
            self._child.stdin.close()
        self._child = None

    async def _stop_child(self) -> None:
        child = self._child
        self._abandon()
        if child is None:
            return
        try:
            await trio.to_thread.run_sync(child.wait, 10)
        except subprocess.TimeoutExpired:
            child.kill()
            await trio.to_thread.run_sync(child.wait)
        if child.stdout is not None:
            child.stdout.close()


def _start_child(device: int) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-m", "tciafs.pagepush", str(device),
                              str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             pass_fds=(device,))
    assert child.stdin is not None and child.stdout is not None
    os.set_blocking(child.stdin.fileno(), False)
    os.set_blocking(child.stdout.fileno(), False)
    return child
