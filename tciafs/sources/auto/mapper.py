"""One pass over a series' objects finds which instance each holds; the map keeps it.

A pass lists the series' prefix once and reads each object not mapped yet: its header
alone (a ranged GET of the first KBs, grown while the header runs past them), or, when
a series stream waits for the series, the whole object, whose bytes then go to the
stream instead of being asked for again (up to HELD_BYTES in memory; past that,
headers alone). Readers of one instance wait only until that instance is found, not
for the whole pass.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from tciafs.sources.base import ClientError
from tciafs.sources.idc import S3Client, S3Object
from tciafs.sources.idc.catalog import SeriesPlace

from .mapping import (
    FIRST_HEAD,
    LONGEST_HEAD,
    HeaderTooLong,
    MappedObject,
    NotDicom,
    ObjectMap,
    sop_of,
)
from .streams import INLINE_OVER, ObjectCheck

log = logging.getLogger("tciafs.auto")

HELD_BYTES = 64 << 20  # whole objects a pass read, waiting for their series stream

Failed = Callable[[MappedObject | None, Exception], None]


class HeldBodies:
    """Whole objects a pass read for a stream: their checked bytes and MD5, by key."""

    def __init__(self, budget: int = HELD_BYTES) -> None:
        self.free = budget
        self._held: dict[str, tuple[list[bytes], str, int]] = {}

    def reserve(self, size: int) -> bool:
        if size > self.free:
            return False
        self.free -= size
        return True

    def release(self, size: int) -> None:
        self.free += size

    def keep(self, key: str, data: list[bytes], md5: str, size: int) -> None:
        self._held[key] = (data, md5, size)

    def take(self, key: str) -> tuple[list[bytes], str] | None:
        held = self._held.pop(key, None)
        if held is None:
            return None
        self.release(held[2])
        return held[0], held[1]

    def peek(self, key: str) -> list[bytes] | None:
        held = self._held.get(key)
        return None if held is None else held[0]

    def drop(self, prefix: str) -> None:
        for key in [k for k in self._held if k.startswith(prefix)]:
            self.take(key)


@dataclass(eq=False)
class _Pass:
    found: dict[str, MappedObject] = field(default_factory=dict)  # by SOP Instance UID
    progress: trio.Event = field(default_factory=trio.Event)  # set, then replaced, per find
    done: trio.Event = field(default_factory=trio.Event)


class Mapper:
    """The instances of each series IDC holds, by object; one pass per series at once."""

    def __init__(self, s3: S3Client, objects: ObjectMap, *, parallel: int,
                 on_failure: Failed) -> None:
        self.s3 = s3
        self.map = objects
        self.parallel = parallel
        self.on_failure = on_failure
        self.bodies = HeldBodies()
        # Where passes run, so that a reader waits for its instance alone; None: each
        # runs in the task that needs it (a source not run()).
        self.nursery: trio.Nursery | None = None
        self._complete: dict[str, dict[str, MappedObject]] = {}  # series → every answer
        self._passes: dict[str, _Pass] = {}
        self._whole: set[str] = set()  # series a stream waits for

    def want_whole(self, series_uid: str) -> None:
        """A stream waits for the series: read its objects whole, not their headers."""
        self._whole.add(series_uid)

    def done_with(self, series_uid: str, place: SeriesPlace) -> None:
        """The stream of the series ended: what it did not take is dropped."""
        self._whole.discard(series_uid)
        self.bodies.drop(place.prefix)

    async def any_found(self, series_uid: str, place: SeriesPlace) -> bool:
        """Whether some object of the series holds an instance: the map says so, or the
        pass finds one (a pass that fails finds none)."""
        run = await self._pass_of(series_uid, place)
        if run is None:
            return bool(self._complete[series_uid])
        while not run.found and not run.done.is_set():
            await run.progress.wait()
        return bool(run.found)

    async def as_found(self, series_uid: str, place: SeriesPlace, order: list[str]
                       ) -> AsyncIterator[MappedObject]:
        """The series' objects: in `order` (of SOP Instance UIDs) where the map holds
        them all, else as the pass finds them, until it ends."""
        run = await self._pass_of(series_uid, place)
        if run is None:
            complete = self._complete[series_uid]
            for sop in order:
                if sop in complete:
                    yield complete[sop]
            return
        seen: set[str] = set()
        while True:
            done = run.done.is_set()
            new = [o for sop, o in run.found.items() if sop not in seen]
            for obj in new:
                seen.add(obj.sop)
                yield obj
            if done:
                return
            if not new:  # no checkpoint since the sweep: no find can be missed
                await run.progress.wait()

    async def object_for(self, series_uid: str, place: SeriesPlace,
                         sop_uid: str) -> MappedObject | None:
        """The object that holds the instance, once found; None if none does."""
        run = await self._pass_of(series_uid, place)
        if run is None:
            return self._complete[series_uid].get(sop_uid)
        while sop_uid not in run.found and not run.done.is_set():
            await run.progress.wait()
        return run.found.get(sop_uid)

    async def _pass_of(self, series_uid: str, place: SeriesPlace) -> _Pass | None:
        """The pass over the series under way, started if needed; None when the series
        is mapped whole already."""
        if series_uid in self._complete:
            return None
        run = self._passes.get(series_uid)
        if run is not None:
            return run
        if self.map.is_mapped(place.bucket, place.prefix):
            self._complete[series_uid] = {o.sop: o for o in self.map.objects(
                place.bucket, place.prefix)}
            return None
        run = self._passes[series_uid] = _Pass()
        if self.nursery is not None:
            self.nursery.start_soon(self._run, series_uid, place, run)
        else:
            await self._run(series_uid, place, run)
        return run

    async def _run(self, series_uid: str, place: SeriesPlace, run: _Pass) -> None:
        try:
            run.found.update((o.sop, o) for o in self.map.objects(place.bucket, place.prefix))
            if await self._pass(series_uid, place, run):
                self._complete[series_uid] = run.found
        except ClientError as exc:
            self.on_failure(None, exc)  # asked again at the next read
        except Exception as exc:  # a background task: never the end of the mount
            log.error("IDC: mapping %s failed: %s: %s", place.prefix, type(exc).__name__, exc)
        finally:
            del self._passes[series_uid]
            if series_uid not in self._whole:  # its stream ended before the pass
                self.bodies.drop(place.prefix)
            run.done.set()
            run.progress.set()

    async def _pass(self, series_uid: str, place: SeriesPlace, run: _Pass) -> bool:
        """Map each object not mapped yet; whether every object has its answer now."""
        listed = [o for o in await self.s3.list_objects(place.bucket, place.prefix)
                  if not o.key.endswith("/") and o.size > 0]
        known = {o.key for o in run.found.values()}
        todo = iter([o for o in listed if o.key not in known])
        new: list[MappedObject] = []
        unanswered: list[ClientError] = []

        async def worker() -> None:
            for o in todo:
                try:
                    obj = await self._read(series_uid, place.bucket, o)
                except NotDicom as exc:
                    log.warning("IDC object %s/%s: %s", place.bucket, o.key, exc)
                    continue
                except ClientError as exc:
                    unanswered.append(exc)
                    continue
                new.append(obj)
                run.found.setdefault(obj.sop, obj)
                run.progress.set()
                run.progress = trio.Event()

        async with trio.open_nursery() as nursery:
            for _ in range(self.parallel):
                nursery.start_soon(worker)
        self.map.add(new)
        log.info("IDC: mapped %d objects of %s/%s", len(new), place.bucket, place.prefix)
        if unanswered:
            raise unanswered[0]
        self.map.mark_mapped(place.bucket, place.prefix, len(listed))
        return True

    async def _read(self, series_uid: str, bucket: str, o: S3Object) -> MappedObject:
        """The object mapped: read whole for a waiting stream where memory allows, else
        by its header."""
        if series_uid in self._whole and o.size <= INLINE_OVER and self.bodies.reserve(o.size):
            kept = False
            try:
                obj = MappedObject(bucket, o.key, "", o.size, o.etag)
                check = ObjectCheck(obj)
                async with self.s3.open(bucket, o.key) as stream:
                    data = [check.take(chunk) async for chunk in stream.chunks()]
                md5 = check.check()
                obj = MappedObject(bucket, o.key, _sop_of_whole(data), o.size, o.etag)
                self.bodies.keep(o.key, data, md5, o.size)
                kept = True
                return obj
            finally:
                if not kept:
                    self.bodies.release(o.size)
        return MappedObject(bucket, o.key, await self._sop_in(bucket, o.key, o.size),
                            o.size, o.etag)

    async def _sop_in(self, bucket: str, key: str, size: int) -> str:
        """The SOP Instance UID an object's header names: a ranged GET of its first
        bytes, grown while the header runs past them."""
        length = FIRST_HEAD
        while True:
            end = min(length, size)
            head = await self.s3.read(bucket, key, (0, end))
            try:
                return sop_of(head, complete=end >= size)
            except HeaderTooLong:
                if length >= LONGEST_HEAD:
                    raise NotDicom(f"no SOP Instance UID in its first {length} bytes") from None
                length = min(length * 8, LONGEST_HEAD)


def _sop_of_whole(data: list[bytes]) -> str:
    """The SOP Instance UID of a whole object's bytes, parsed from its first KBs where
    the header ends there (most do): the object is not copied whole to be parsed."""
    head = bytearray()
    for chunk in data:
        head += chunk
        if len(head) >= FIRST_HEAD:
            break
    try:
        return sop_of(bytes(head), complete=len(head) >= sum(map(len, data)))
    except HeaderTooLong:
        return sop_of(b"".join(data), complete=True)
