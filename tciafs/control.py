"""Carrying out the commands a running mount accepts through its control file.

`tciafs cache prefetch|pin|unpin|clear` (and `verify --repair`, as "drop", and
`tciafs logout`) reach the daemon over its control socket (tciafs.controlserver), which
hands each to the handler of an xattr on the hidden control file; tciafs.controlproto
holds the protocol's names and encodings. Prefetch jobs run in the background; their
progress is part of the status document.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import trio

from tciafs.backoff import Backoff
from tciafs.cache import Cache, CacheFull
from tciafs.catalog import ROOT_INODE, Kind, Node, job_ended_by
from tciafs.controlproto import COMMANDS, dropped_sops, names_uid
from tciafs.paths import format_size
from tciafs.tree import Tree

log = logging.getLogger(__name__)


class TargetError(Exception):
    """The target names nothing in the archive."""


KEPT_JOBS = 20
# A job fetches again the series that failed for the service's or the network's sake,
# first after RETRY_FIRST seconds, then twice as long each time up to RETRY_MAX, for up
# to RETRY_FOR after it began: an outage overnight does not end a long prefetch.
RETRY_FIRST = 30.0
RETRY_MAX = 900.0
RETRY_FOR = 24 * 3600.0
# Series of one job fetching or waiting for a slot at once; the cache fetches 4 at a time.
# One task per series waiting its turn would cost about 4 kB each: 800 MB for 200,000.
JOB_WINDOW = 8


class SeriesRef(NamedTuple):
    """What a job keeps of each series: a listing's node carries its whole metadata,
    about 4.4 kB (72 bytes for this), 870 MB for a job of 200,000 series."""

    collection: str
    ident: str


@dataclass
class Job:
    target: str
    series: list[SeriesRef]
    command: str = "prefetch"
    started: float = field(default_factory=time.time)
    total_bytes: int = 0
    # Each series' fetch, set once it has ended (set from the start for one complete then).
    fetches: dict[str, trio.Event] = field(default_factory=dict)
    patient: bool = False  # series that failed for now will be fetched again
    retry_at: float | None = None
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)  # of its retries


class Control:
    def __init__(self, tree: Tree, cache: Cache, *, retry_first: float = RETRY_FIRST,
                 retry_max: float = RETRY_MAX, retry_for: float = RETRY_FOR) -> None:
        self.tree = tree
        self.cache = cache
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self.retry_first, self.retry_max, self.retry_for = retry_first, retry_max, retry_for
        self._nursery: trio.Nursery | None = None

    async def run_jobs(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
                       ) -> None:
        """Host the jobs' retries; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.tree is not None:
                nursery.start_soon(self._resume_stored)
            await trio.sleep_forever()

    async def run(self, command: str, target: str, *, started: float | None = None) -> int:
        """Carry out a command; returns the job id for prefetch/pin, else 0. `started`:
        when a job taken up again from a previous mount began."""
        if command not in COMMANDS:
            raise ValueError(command)
        if command == "logout":
            await self.tree.source.become_guest()
            log.info("logged out: the user's token is revoked; going on as the guest")
            return 0
        if command == "drop":
            await self._drop(dropped_sops(target))
            return 0
        try:
            node = await self.resolve(target)
        except TargetError:
            if command in ("unpin", "clear") and self._cached_only(command, target.strip()):
                return 0
            raise
        if command == "clear" and node.kind is Kind.ROOT:
            self._cancel_jobs("prefetch")
            self.cache.clear()  # everything: no need to walk (and list) the archive
            return 0
        series = await self.series_under(node)
        if command in ("clear", "unpin"):
            self._cancel_jobs("prefetch" if command == "clear" else "pin", target)
        if command == "clear":
            for s in series:
                self.cache.clear(s.ident)
            return 0
        if command in ("prefetch", "pin"):
            self._check_fits(target, series)
        if command in ("pin", "unpin"):
            for s in series:
                self.cache.pin_series(s.ident, s.collection, command == "pin")
            if command == "unpin":
                return 0
        job_id = self._start_job(target, series, command, started)
        self.tree.catalog.save_job(command, target, self.jobs[job_id].started)
        return job_id

    async def _resume_stored(self) -> None:
        """Take up the jobs a previous mount left unfinished (a restart, a crash, a
        reboot): what they fetched is cached, and they go on from there."""
        for command, target, started in self.tree.catalog.stored_jobs():
            try:
                await self.run(command, target, started=started)
            except (TargetError, CacheFull) as exc:  # gone from the archive, or too big now
                log.warning("%s of %s, left unfinished by the last mount, is dropped: %s",
                            command, target, exc)
                self.tree.catalog.forget_job(command, target)
                continue
            except Exception as exc:  # offline with nothing listed, say: the next mount
                log.warning("%s of %s, left unfinished by the last mount, could not be "
                            "taken up: %s", command, target, exc)
                continue
            log.info("%s of %s, left unfinished by the last mount, goes on", command, target)

    def _cancel_jobs(self, command: str, target: str | None = None) -> None:
        """clear PATH ends the prefetch jobs of PATH, or of a path ending in it (a bare
        UID; clear without PATH, every one), unpin PATH its pin jobs: no retries, and no
        taking them up at the next mount."""
        self.tree.catalog.forget_jobs_ended_by(command, target)
        for job in self.jobs.values():
            if job.command == command and job_ended_by(job.target, target):
                job.cancel.cancel()

    def _check_fits(self, target: str, series: list[Node]) -> None:
        """Refuse what the cache can never hold at once: the job would evict its own first
        series to fetch its last ones, and never finish."""
        total = _total_bytes(series)
        if total > self.cache.max_bytes:
            raise CacheFull(f"{target}: its {format_size(total)} exceed the cache's bound of "
                            f"{format_size(self.cache.max_bytes)}; prefetch a part of it, or "
                            "mount with a larger --cache-size")

    async def _drop(self, sops: list[str]) -> None:
        """Files `cache verify --repair` found damaged on disk (SOP UIDs): dropped, with
        the kernel's copies, so that the next read fetches them again. Open ones stay."""
        dropped = self.cache.discard(sops)
        if self.cache.on_refused is not None:
            for sop in dropped:
                await self.cache.on_refused(sop)
        log.warning("dropped %d cached files found damaged on disk%s", len(dropped),
                    f"; {len(sops) - len(dropped)} open or gone already were left"
                    if len(dropped) < len(sops) else "")

    def _cached_only(self, command: str, uid: str) -> bool:
        """A series the archive no longer lists (withdrawn) may still be in the cache,
        pinned: unpin and clear take its bare UID, as `cache stats` shows it."""
        collection = self.cache.series_collection(uid)
        if collection is None:
            return False
        if command == "unpin":
            self.cache.pin_series(uid, collection, False)
        else:
            self.cache.clear(uid)
        log.info("%s of series %s, which the archive no longer lists", command, uid)
        return True

    def _start_job(self, target: str, series: list[Node], command: str = "prefetch",
                   started: float | None = None) -> int:
        job = Job(target, [SeriesRef(s.collection, s.ident) for s in series],
                  command=command, total_bytes=_total_bytes(series),
                  started=started or time.time())
        job_id = next(self._ids)
        self.jobs[job_id] = job
        self._forget_finished()
        for s in job.series:
            self.cache.failed_series.pop(s.ident, None)  # an explicit request tries again
            if self.cache.series_complete(s.ident):
                job.fetches[s.ident] = _ENDED
            elif self._nursery is None:  # no one to feed them in turn: all at once
                job.fetches[s.ident] = self.cache.start_series_fetch(s.collection, s.ident)
        if self._nursery is not None:
            job.patient = True
            self._nursery.start_soon(self._see_through, job)
        log.info("prefetch job %d: %d series under %s", job_id, len(series), target)
        return job_id

    async def resolve(self, target: str) -> Node:
        target = target.strip()
        if names_uid(target):
            node = self.tree.catalog.find_uid(target)
            if node is None:
                raise TargetError(f"no listed study or series has UID {target} "
                                  "(list its patient directory first, or give a path)")
            return node
        node = self.tree.node(ROOT_INODE)
        for part in (p for p in target.split("/") if p and p != "."):
            assert node is not None
            child = await self.tree.lookup(node.ino, part)
            if child is None:
                raise TargetError(f"no such entry: {target}")
            node = child
        assert node is not None
        return node

    async def series_under(self, node: Node) -> list[Node]:
        if node.kind is Kind.SERIES:
            return [node]
        if node.kind is Kind.SIDECAR:
            return []
        if node.kind is Kind.INSTANCE:
            parent = self.tree.node(node.parent)
            return [parent] if parent is not None else []
        found = []
        for child in await self.tree.children(node.ino):
            found.extend(await self.series_under(child))
        return found

    async def _see_through(self, job: Job) -> None:
        """Fetch again the series that failed for a reason that may pass, waiting longer
        each time, until retry_for after the job began; the rest stay failed.

        One series goes first: while it fails again, the others wait too, so that a
        service that is down sees one request per retry, not one per series."""
        try:
            with job.cancel:
                await self._feed(job)
                await self._retry(job)
        finally:
            job.patient = False
            job.retry_at = None

    async def _feed(self, job: Job) -> None:
        """Start the job's series a few at a time, in order, each once the oldest of those
        under way has ended."""
        under_way: collections.deque[trio.Event] = collections.deque()
        for s in job.series:
            if s.ident in job.fetches:
                continue
            while len(under_way) >= JOB_WINDOW:
                await under_way.popleft().wait()
            job.fetches[s.ident] = self.cache.start_series_fetch(s.collection, s.ident)
            under_way.append(job.fetches[s.ident])

    async def _retry(self, job: Job) -> None:
        rule = Backoff(base=self.retry_first, cap=self.retry_max)
        failures = 0  # rounds in a row in which the first series failed again
        while True:
            delay = rule.delay(failures)
            for fetch in list(job.fetches.values()):
                await fetch.wait()
            again = [s for s in job.series if self.cache.failed_for_now(s.ident)]
            if not again or time.time() + delay > job.started + self.retry_for:
                if self.tree is not None:  # ended: nothing to take up at the next mount
                    self.tree.catalog.forget_job(job.command, job.target)
                return
            job.retry_at = time.time() + delay
            log.warning("prefetch of %s: %d series failed for now (%s); trying again "
                        "in %.0f s", job.target, len(again),
                        self.cache.failed_series[again[0].ident], delay)
            await trio.sleep(delay)
            job.retry_at = None
            await self._fetch_again(job, again[0]).wait()
            if self.cache.failed_for_now(again[0].ident):
                failures += 1
                continue
            for s in again[1:]:
                self._fetch_again(job, s)
            failures = 0

    def _fetch_again(self, job: Job, series: SeriesRef) -> trio.Event:
        if self.cache.failed_for_now(series.ident):  # else a reader fetched it meanwhile
            self.cache.failed_series.pop(series.ident, None)
            job.fetches[series.ident] = self.cache.start_series_fetch(series.collection,
                                                                      series.ident)
        return job.fetches[series.ident]

    def _forget_finished(self) -> None:
        """Keep the last KEPT_JOBS jobs: status reports every kept one, at a query per series."""
        for job_id in list(self.jobs)[:-KEPT_JOBS]:
            job = self.jobs[job_id]
            if all(self._state(job, s.ident) not in ("running", "waiting")
                   for s in job.series):
                del self.jobs[job_id]

    def _state(self, job: Job, series: str) -> str:
        """done, failed, waiting (failed for now, to be tried again), lost (fetched, then
        evicted again before the job ended) or running."""
        if self.cache.series_complete(series):
            return "done"
        if series in self.cache.failed_series:
            return "waiting" if job.patient and self.cache.failed_for_now(series) else "failed"
        fetch = job.fetches.get(series)
        if fetch is not None and fetch.is_set() and not self.cache.is_fetching(series):
            return "lost"
        return "running"

    def progress(self) -> dict[str, dict]:
        out = {}
        for job_id, job in self.jobs.items():
            states = {s.ident: self._state(job, s.ident) for s in job.series}
            failed = {uid: self.cache.failed_series[uid] for uid, state in states.items()
                      if state == "failed"}
            have = sum(self.cache.cached_bytes(s.ident) for s in job.series)
            out[str(job_id)] = {"target": job.target, "series": len(job.series),
                                "series_done": list(states.values()).count("done"),
                                "series_failed": len(failed),
                                "series_lost": list(states.values()).count("lost"),
                                "series_waiting": list(states.values()).count("waiting"),
                                "retry_at": job.retry_at,
                                "waiting_reason": next(
                                    (self.cache.failed_series[uid] for uid, state in
                                     states.items() if state == "waiting"), None),
                                "failures": dict(list(failed.items())[:5]), "bytes": have,
                                "total_bytes": job.total_bytes,
                                "elapsed": time.time() - job.started}
        return out


def _total_bytes(series: list[Node]) -> int:
    return sum(s.meta.get("file_size") or 0 for s in series)


def _ended() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


_ENDED = _ended()  # the fetch of a series complete already: nothing to wait for
