"""The bound: what the cache directory takes, room claimed before bytes are written, and
eviction to make that room.

Everything under the cache directory counts: cached files, downloads in progress (by
the room they reserved), the SQLite files and the directories themselves. Room is
reserved before each chunk is written and eviction happens right there, never by
polling, so the directory never holds more than the bound (docs/design/cache.md,
"Invariants").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from .contents import Contents, Holds
from .model import CacheFull

META_SLACK = 1 << 20  # the WAL checkpoints at 100 pages; the index grows in small steps
RESERVE_STEP = 1 << 20
# A download that finds the cache full while other downloads go on waits for them to
# free room; after ROOM_IDLE seconds in which nothing was freed, or ROOM_WAIT in all, it
# goes on with only the room each chunk needs, and fails if even that is refused.
ROOM_IDLE = 2.0
ROOM_WAIT = 60.0


class Space:
    def __init__(self, root: Path, max_bytes: int, contents: Contents, holds: Holds,
                 drop: Callable[[str], None]) -> None:
        """`drop` takes a cached file out of the cache; eviction calls it."""
        self.root = root
        self.max_bytes = max_bytes
        self.contents = contents
        self.holds = holds
        self.drop = drop
        self.file_bytes = 0  # cached files plus reservations of downloads in progress
        self._dir_bytes: dict[str, int] = {}
        self._reservations: set[Reservation] = set()  # of downloads in progress
        self._waiters = 0  # downloads waiting for room (room_freed)
        self._freed = trio.Event()
        holds.on_free = self._room_changed

    # -- what is used --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.file_bytes + self._meta_bytes() + sum(self._dir_bytes.values())

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

    def measure_dir(self, path: Path) -> None:
        # Directories take room too (`du` counts them); they grow as files are added.
        with contextlib.suppress(FileNotFoundError):
            self._dir_bytes[str(path)] = path.stat().st_size

    def knows_dir(self, path: Path) -> bool:
        return str(path) in self._dir_bytes

    def count(self, nbytes: int) -> None:
        """Files found in the cache at start."""
        self.file_bytes += nbytes

    # -- claiming room -------------------------------------------------------------------

    def reserve(self, nbytes: int, series: str, *, reclaim: bool = True) -> None:
        """Claim room for `nbytes` more, evicting as needed; raise CacheFull if impossible.
        Measure, evict and account in one step, with no await between (docs/design/
        cache.md, "Concurrency"): two downloads could otherwise claim the same room.
        `reclaim`: take back room other downloads reserved ahead, as a last resort."""
        # META_SLACK keeps room for the SQLite files to grow until the next checkpoint.
        need = self.used_bytes + nbytes + META_SLACK - self.max_bytes
        if need > 0:
            self.evict(need, series, reclaim=reclaim)
        self.file_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """Bytes no longer taken: a file dropped, or room a download did not use."""
        self.file_bytes -= nbytes
        if nbytes > 0:
            self._room_changed()

    def _room_changed(self) -> None:
        """Room was freed, or a file became evictable: wake the downloads waiting."""
        if self._waiters:
            self._freed.set()
            self._freed = trio.Event()

    def worth_waiting(self, room: Reservation) -> bool:
        """Whether `room` may wait for others to free room: downloads other than it are
        going on, not waiting for room themselves (they will end, and free room or leave
        files that can be evicted), and none of its series' finished files waits to be
        published (that series' ZIP publishes them only once `room` is written)."""
        busy = False
        for other in self._reservations:
            if other.written and other.series == room.series:
                return False
            busy = busy or (other is not room and not (other.waiting or other.written))
        return busy

    def room_for_extras(self) -> bool:
        """Whether downloads that only speed others up (single images beside a series'
        ZIP) may start: none waits for room, and those in progress hold under a quarter
        of the bound. In a small cache, room is for what readers need."""
        if self._waiters:
            return False
        return sum(room.reserved for room in self._reservations) < self.max_bytes // 4

    def wanted(self) -> bool:
        """Whether downloads are waiting for room."""
        return self._waiters > 0

    async def room_freed(self, deadline: float) -> bool:
        """Wait until room may have been freed; False when nothing was for ROOM_IDLE
        seconds, or `deadline` (trio's clock) passed."""
        self._waiters += 1
        try:
            with trio.move_on_at(min(deadline, trio.current_time() + ROOM_IDLE)):
                await self._freed.wait()
                return True
            return False
        finally:
            self._waiters -= 1

    @contextlib.contextmanager
    def reservation(self, series: str, expected: int | None) -> Iterator[Reservation]:
        """The room of one download, for as long as it goes on."""
        room = Reservation(self, series, expected)
        self._reservations.add(room)
        try:
            yield room
        finally:
            self._reservations.discard(room)
            self._room_changed()

    # -- eviction ------------------------------------------------------------------------

    def evict(self, need: int, series: str, *, reclaim: bool = True) -> None:
        """Drop files, least recently used first, until `need` bytes are free. Files of
        busy series go only when nothing else is left; held and pinned ones never.
        Without `reclaim` (a download that would rather wait), nothing is dropped
        unless enough can be."""
        victims, freed = self._victims(need)
        if freed < need and not reclaim:
            raise CacheFull(f"cache full: {self.max_bytes} bytes bound, taken by "
                            f"downloads in progress while reading series {series}")
        for sop in victims:
            self.drop(sop)
        need -= freed
        if need > 0 and reclaim:
            need -= self._reclaim_ahead()
        if need > 0:
            raise CacheFull(f"cache full: {self.max_bytes} bytes bound, nothing evictable "
                            f"(open or pinned files hold it) while reading series {series}")

    def _victims(self, need: int) -> tuple[list[str], int]:
        """The files eviction would drop for `need` bytes, and their bytes: looked at in
        order only until there are enough (a full cache is the usual state, and may hold
        10^5 entries)."""
        victims: list[str] = []
        freed = 0
        for busy in (False, True):  # files of busy series only when nothing else is left
            for sop, size in self.contents.files.items():
                if freed >= need:
                    return victims, freed
                if self._evictable(sop) and self._busy(sop) is busy:
                    victims.append(sop)
                    freed += size
        return victims, freed

    def _evictable(self, sop: str) -> bool:
        return not self.holds.open[sop] and sop not in self.contents.pinned

    def _busy(self, sop: str) -> bool:
        return bool(self.holds.busy[self.contents.series_of.get(sop, "")])

    def _reclaim_ahead(self) -> int:
        """Take back the room downloads reserved ahead of their bytes; return how much."""
        freed = 0
        for room in self._reservations:
            freed += room.reserved - room.used
            room.settle()
        return freed


class Reservation:
    """The room one download claimed: `used` by the bytes it wrote, and more reserved
    ahead in steps, far fewer calls than one per chunk."""

    def __init__(self, space: Space, series: str, expected: int | None) -> None:
        self.space = space
        self.series = series
        self.expected = expected  # the file's size, when the server said it
        self.used = 0
        self.reserved = 0
        self.waiting = False  # for room (claim)
        self.written = False  # every byte is in; it waits to be published

    async def claim(self, nbytes: int) -> None:
        """`take`, but while other downloads hold the room, wait for them to finish
        rather than write on with only the room this chunk needs: a cache too small
        for many readers at once then slows them down instead of failing them, and a
        download that has its room never waits for one that has not."""
        if self.used + nbytes <= self.reserved:
            self.used += nbytes
            return
        deadline = trio.current_time() + ROOM_WAIT
        while self.space.worth_waiting(self):
            try:
                self.take(nbytes, patient=True)
                return
            except CacheFull:
                pass
            self.waiting = True
            try:
                freed = await self.space.room_freed(deadline)
            finally:
                self.waiting = False
            if not freed:
                break
        self.take(nbytes)

    def take(self, nbytes: int, *, patient: bool = False) -> None:
        """Room for `nbytes` more bytes, reserved before they are written. `patient`:
        the expected rest of the file or nothing, taking no room back from others."""
        if self.used + nbytes > self.reserved:
            self._reserve_for(nbytes, patient)
        self.used += nbytes

    def _reserve_for(self, nbytes: int, patient: bool) -> None:
        """Reserve the expected rest of the file, or a MiB ahead; what stays unused is
        given back when the file is published. Near a full cache, unless `patient`,
        fall back to exactly what this chunk needs."""
        need = self.used + nbytes - self.reserved
        ahead = (self.expected - self.reserved if self.expected and self.expected > self.used
                 else RESERVE_STEP)
        step = max(need, ahead)
        try:
            self.space.reserve(step, self.series, reclaim=not patient)
        except CacheFull:
            if step == need or patient:
                raise
            # Reclaiming may have settled this very file: ask again for what it lacks.
            step = self.used + nbytes - self.reserved
            self.space.reserve(step, self.series)
        self.reserved += step

    def make_room(self, nbytes: int) -> None:
        """Evict for bytes the disk refused though they were reserved (it filled for
        reasons outside the cache)."""
        self.space.evict(nbytes, self.series)

    def settle(self) -> None:
        """Give back the reserved room the bytes did not use."""
        self.space.release(self.reserved - self.used)
        self.reserved = self.used

    def give_back(self) -> None:
        """The download is dropped: all its room is free again."""
        self.space.release(self.reserved)
        self.reserved = 0
