"""Listing ahead of a traversal: the directories a depth-first walk reads next.

A traversal (find, ls -R, du, rsync) reads one directory after another and would wait
out one round trip for each: once it reads one, the next directories a depth-first walk
reads that are not listed yet (patients, series, within its collection) are listed
alongside, a few at a time. The guesses are made from the stored listings only, and
looked for within a bounded scan (docs/design/metadata.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from tciafs.catalog import Kind, ListingUnavailable, Node
from tciafs.sources.base import ClientError

if TYPE_CHECKING:
    from tciafs.tree import Tree

log = logging.getLogger(__name__)

LIST_AHEAD = 16  # listings fetched ahead of a traversal
SCAN_BUDGET = 256  # stored entries looked at to find them
# Two different directories of one level read within this many seconds make a
# traversal; one series read alone (`ls` of it, then a file opened) fetches nothing ahead.
TRAVERSAL_GAP = 5.0
SOON_AFTER = 0.1  # seconds before listing what a guess names (`soon`)

# What a traversal reading directories of one level lists ahead: no deeper level than
# it reads (a glob down to the studies never reads the series' instances, which would
# fill the catalog), and patients, whose listing brings the studies and series below.
_AHEAD_OF: dict[Kind, frozenset[Kind]] = {
    Kind.SERIES: frozenset({Kind.SERIES, Kind.PATIENT}),
    Kind.STUDY: frozenset({Kind.PATIENT}),
    Kind.PATIENT: frozenset({Kind.PATIENT}),
}


class ListAhead:
    def __init__(self, tree: Tree, at_once: int) -> None:
        self.tree = tree
        self._nursery: trio.Nursery | None = None
        self._ahead: set[int] = set()  # directories whose listing is fetched ahead now
        self.listed_ahead = 0  # listings fetched ahead of a traversal, for status
        self._last_read: tuple[int, Kind, float] | None = None  # directory read last
        # Fewer than the source's connections: a reader's own requests must not queue
        # behind guesses (0: none fetched ahead).
        self._limiter = trio.CapacityLimiter(at_once) if at_once else None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the listings fetched ahead; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def read(self, directory: Node) -> None:
        """A directory is read from its start: if a traversal reads it, fetch in the
        background, a few at a time, the listings it reads next: depth first, the
        patients and series after this one in its collection that are not listed yet (a
        patient's listing brings its studies and series)."""
        now, last = trio.current_time(), self._last_read
        self._last_read = (directory.ino, directory.kind, now)
        # Two directories of one level in a row make a traversal: a path walked down to
        # one series, then that series read, does not.
        if (self._nursery is None or self._limiter is None or last is None
                or last[0] == directory.ino or last[1] is not directory.kind
                or now - last[2] > TRAVERSAL_GAP
                or self.tree.serving_stored(now)
                # A walk over stored listings: nothing to fetch, and no scan for it.
                or now - self.tree.last_fetch > TRAVERSAL_GAP):
            return
        kinds = _AHEAD_OF.get(directory.kind, frozenset())
        for ino in self._unlisted_after(directory, LIST_AHEAD, kinds):
            self._start(ino, 0.0)

    def soon(self, directories: list[Node]) -> None:
        """List these directories in the background, when not listed yet: the mount
        guessed that they will be read (the series of a study being fetched). After
        SOON_AFTER: the downloads that the same guess started take their connections
        first, and a reader gets to these directories later than that."""
        if self._nursery is None or self._limiter is None:
            return
        for node in directories:
            if not self.tree.fresh(node.listed):
                self._start(node.ino, SOON_AFTER)

    def _start(self, ino: int, after: float) -> None:
        """Fetch the listing of `ino` in `after` seconds, unless it is fetched ahead now."""
        assert self._nursery is not None
        if ino not in self._ahead:
            self._ahead.add(ino)
            self._nursery.start_soon(self._fetch, ino, after)

    async def _fetch(self, ino: int, after: float) -> None:
        assert self._limiter is not None
        try:
            await trio.sleep(after)
            async with self._limiter:
                node = self.tree.node(ino)
                if node is not None and not self.tree.servable(node):
                    await self.tree.listed(ino)
                    self.listed_ahead += 1
        except (ClientError, ListingUnavailable, NotADirectoryError) as exc:
            log.debug("listing ahead of inode %d: %s", ino, exc)  # the reader will ask
        except Exception:  # a guess must never end the mount
            log.exception("listing ahead of inode %d failed", ino)
        finally:
            self._ahead.discard(ino)

    def _unlisted_after(self, node: Node, count: int, kinds: frozenset[Kind]) -> list[int]:
        """Up to `count` directories of `kinds` not listed yet that a depth-first walk
        reads after `node`, from the stored listings; a bounded look (a collection may
        hold 10^5 patients, and a warm one needs none of them)."""
        found: list[int] = []
        budget = [SCAN_BUDGET]
        if not kinds:
            return found
        if node.kind is not Kind.SERIES:
            self._scan(node.ino, 0, count, found, budget, kinds)
        # Within the collection: the next one costs its walk one round trip, and a
        # guess across collections would list what `ls -R` of one never reads.
        while (node.kind not in (Kind.ROOT, Kind.COLLECTION) and len(found) < count
               and budget[0] > 0):
            self._scan(node.parent, node.ino, count, found, budget, kinds)
            parent = self.tree.node(node.parent)
            if parent is None:
                break
            node = parent
        return found[:count]

    def _scan(self, parent: int, after: int, count: int, found: list[int],
              budget: list[int], kinds: frozenset[Kind]) -> None:
        fresh = self.tree.fresh
        for ino, kind, listed in self.tree.catalog.outline_after(parent, after,
                                                                 min(budget[0], 4 * count)):
            budget[0] -= 1
            if len(found) >= count or budget[0] <= 0:
                return
            if kind in kinds and not fresh(listed):
                found.append(ino)
            elif Kind.SERIES in kinds and (kind is Kind.STUDY or (
                    kind is Kind.PATIENT and fresh(listed))):
                self._scan(ino, 0, count, found, budget, kinds)  # down to its series
