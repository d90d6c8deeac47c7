"""AutoSource: NBIA's tree, IDC's bytes where IDC holds them, as TCIA's own retriever does.

Names, listings, logins and carts are NBIA's (an NbiaSource). A series whose
SeriesInstanceUID is in the IDC catalog is read from its bucket: each object is matched
to the instance its header names (mapping.py keeps the answers on disk), and an
instance IDC lacks (a series revised in NBIA since) comes from NBIA. Whatever IDC does
not hold, or cannot serve now (SlowDown past the retries, a reset, a missing object,
bytes that fail their checks), comes from NBIA's getImage and getSingleImage.
docs/auto.md tells the rules.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tciafs.sources.base import (
    Capabilities,
    ClientError,
    Collection,
    CollectionFacts,
    Instance,
    InstanceStream,
    Patient,
    Series,
    SeriesStream,
    ServerError,
    Study,
)
from tciafs.sources.idc import IdcSource
from tciafs.sources.idc import build as build_idc
from tciafs.sources.idc.catalog import SeriesPlace
from tciafs.sources.nbia import NbiaSource
from tciafs.sources.nbia import build as build_nbia

from .mapper import Mapper
from .mapping import MappedObject, ObjectMap
from .streams import CheckedObject, HeldObject, IdcSeriesStream, Member, ObjectCheck, etag_md5

log = logging.getLogger("tciafs.auto")

IDC, NBIA = "idc", "nbia"
REST_AFTER_FAILURE = 60.0  # seconds the bucket is left alone after it kept failing
MAP_FILE = "idc-object-map.sqlite"
SERVED_BY_KEPT = 4096  # routes of downloads whose MD5 is not asked for yet


class AutoStats:
    """Both archives' request counters, summed for `tciafs status`, and each apart."""

    def __init__(self, nbia: Any, idc: Any) -> None:
        self._nbia, self._idc = nbia, idc

    def as_dict(self) -> dict[str, object]:
        nbia, idc = self._nbia.as_dict(), self._idc.as_dict()
        requests = {**nbia.get("requests", {}),
                    **{f"s3/{k}": v for k, v in idc.get("requests", {}).items()}}
        errors = {**nbia.get("errors", {}),
                  **{f"s3/{k}": v for k, v in idc.get("errors", {}).items()}}
        return {**nbia, "requests": requests, "requests_total": sum(requests.values()),
                "errors": errors, "retries": nbia.get("retries", 0) + idc["retries"],
                "bytes_received": nbia.get("bytes_received", 0) + idc["bytes_received"],
                "nbia": nbia, "idc": idc}


class AutoSource:
    """The Source protocol (tciafs.sources.base) over an NbiaSource and an IdcSource."""

    name = "auto"

    def __init__(self, nbia: NbiaSource, idc: IdcSource, objects: ObjectMap, *,
                 parallel: int = 8) -> None:
        self.nbia = nbia
        self.idc = idc
        self.parallel = parallel
        self.mapper = Mapper(idc.s3, objects, parallel=parallel,
                             on_failure=self._bucket_failed)
        # NBIA's, as is: series streams stay true, since a series from IDC is handed to
        # the cache as a stream of parallel object GETs (IdcSeriesStream).
        self.capabilities: Capabilities = nbia.capabilities
        self.stats = AutoStats(nbia.stats, idc.stats)
        self._failed: set[str] = set()  # keys that failed this mount: NBIA serves them
        self._rest_until = 0.0  # trio time before which the bucket is not asked
        # Which object (None: NBIA) serves the instance a download under way asked for,
        # once decided; instance_md5 answers for those bytes.
        self._deciding: dict[str, trio.Event] = {}
        self._served_by: dict[str, MappedObject | None] = {}

    def __repr__(self) -> str:
        return f"AutoSource({self.nbia!r}, {self.idc!r})"

    # -- lifecycle: NBIA's; the buckets need no login --------------------------------------

    async def start(self) -> None:
        await self.nbia.start()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """NBIA's token renewal, and the passes that map series."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.nbia.run)
            self.mapper.nursery = nursery
            task_status.started()
            await trio.sleep_forever()  # the nursery stays open to passes

    async def become_guest(self) -> None:
        await self.nbia.become_guest()

    async def aclose(self) -> None:
        try:
            await self.nbia.aclose()
            await self.idc.aclose()
        finally:
            self.mapper.map.close()

    async def __aenter__(self) -> AutoSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def unreachable(self) -> Mapping[str, Mapping[str, object]]:
        return self.nbia.unreachable

    def traffic(self) -> dict[str, int]:
        """Bytes received from each archive: NBIA's and IDC's counts side by side."""
        return {**self.nbia.traffic(), **self.idc.traffic()}

    @property
    def catalog_version(self) -> str | None:
        """The version of the IDC catalog that decides which series come from a bucket."""
        return self.idc.catalog_version

    # -- listings: NBIA's ----------------------------------------------------------------

    def remember_collections(self, stored: Iterable[Collection]) -> None:
        self.nbia.remember_collections(stored)

    def collection_named(self, name: str) -> Collection:
        return self.nbia.collection_named(name)

    async def collections(self, stored: Sequence[Collection] = ()) -> list[Collection]:
        return await self.nbia.collections(stored)

    async def patients(self, collection: str) -> list[Patient]:
        return await self.nbia.patients(collection)

    async def studies(self, collection: str, patient_id: str | None = None) -> list[Study]:
        return await self.nbia.studies(collection, patient_id)

    async def series(self, collection: str, patient_id: str | None = None) -> list[Series]:
        return await self.nbia.series(collection, patient_id)

    async def series_by_uid(self, series_uid: str) -> list[Series]:
        return await self.nbia.series_by_uid(series_uid)

    async def cart(self, name: str) -> list[Series]:
        return await self.nbia.cart(name)

    async def instances(self, collection: str, series_uid: str) -> list[Instance]:
        return await self.nbia.instances(collection, series_uid)

    def collection_facts(self, collection: str) -> CollectionFacts:
        return self.nbia.collection_facts(collection)

    def source_of_series(self, series_uid: str) -> str:
        """"idc" for a series the IDC catalog holds, else "nbia": where its bytes come
        from (an instance IDC lacks, or a bucket failing, still comes from NBIA). No
        request: the catalog is in memory."""
        return IDC if self._place(series_uid) is not None else NBIA

    # -- the mapping ---------------------------------------------------------------------

    def _place(self, series_uid: str) -> SeriesPlace | None:
        return self.idc.catalog.place(series_uid)

    def _resting(self) -> bool:
        return trio.current_time() < self._rest_until

    def _bucket_failed(self, obj: MappedObject | None, exc: Exception) -> None:
        """Route what failed to NBIA: the object for this mount, and after a server
        failure (retries spent) the whole bucket for a while."""
        if obj is not None:
            self._failed.add(obj.key)
        if isinstance(exc, ServerError):
            self._rest_until = trio.current_time() + REST_AFTER_FAILURE
        what = obj.key if obj is not None else "the bucket"
        log.warning("IDC: %s failed (%s); reading from NBIA instead", what, exc)

    # -- bytes ---------------------------------------------------------------------------

    async def _object_for(self, series_uid: str, sop_uid: str) -> MappedObject | None:
        place = self._place(series_uid)
        if place is None or self._resting():
            return None
        obj = await self.mapper.object_for(series_uid, place, sop_uid)
        return None if obj is None or obj.key in self._failed else obj

    def open_instance(self, collection: str, series_uid: str, sop_uid: str, *,
                      byte_range: tuple[int, int] | None = None, fresh: bool = False
                      ) -> AbstractAsyncContextManager[InstanceStream]:
        if byte_range is not None:
            raise ValueError("auto serves whole instances only (NBIA's take no range)")
        # Before any await: instance_md5, asked alongside, waits for the route chosen.
        self._deciding[sop_uid] = trio.Event()
        return self._open_instance(collection, series_uid, sop_uid, fresh)

    @asynccontextmanager
    async def _open_instance(self, collection: str, series_uid: str, sop_uid: str,
                             fresh: bool) -> AsyncIterator[InstanceStream]:
        async with AsyncExitStack() as stack:
            stream = await self._route(stack, collection, series_uid, sop_uid, fresh)
            yield stream

    async def _route(self, stack: AsyncExitStack, collection: str, series_uid: str,
                     sop_uid: str, fresh: bool) -> InstanceStream:
        deciding = self._deciding.get(sop_uid)
        if len(self._served_by) > SERVED_BY_KEPT:  # MD5s the cache knew, so never asked
            del self._served_by[next(iter(self._served_by))]
        obj: MappedObject | None = None
        try:
            obj = await self._object_for(series_uid, sop_uid)
            held = None if obj is None else self.mapper.bodies.peek(obj.key)
            if obj is not None and held is not None:  # a pass read it whole, checked
                self._served_by[sop_uid] = obj
                return HeldObject(held, obj.size)
            if obj is not None:
                try:
                    inner = await stack.enter_async_context(
                        self.idc.s3.open(obj.bucket, obj.key))
                    self._served_by[sop_uid] = obj
                    return CheckedObject(inner, obj, self._bucket_failed)
                except ClientError as exc:
                    self._bucket_failed(obj, exc)
            self._served_by[sop_uid] = None
        finally:
            if deciding is not None:
                deciding.set()
                if self._deciding.get(sop_uid) is deciding:
                    del self._deciding[sop_uid]
        return await stack.enter_async_context(
            self.nbia.open_instance(collection, series_uid, sop_uid, fresh=fresh))

    async def instance_md5(self, collection: str, series_uid: str, sop_uid: str, *,
                           fresh: bool = False) -> str | None:
        """The MD5 of the bytes open_instance serves: an IDC object's ETag where it is an
        MD5 (None where it is not: the size and the header are checked then), else
        NBIA's."""
        deciding = self._deciding.get(sop_uid)
        if deciding is not None:
            await deciding.wait()
        if sop_uid in self._served_by:
            obj = self._served_by.pop(sop_uid)
        else:
            obj = await self._object_for(series_uid, sop_uid)
        if obj is not None:
            return etag_md5(obj)
        return await self.nbia.instance_md5(collection, series_uid, sop_uid, fresh=fresh)

    def open_series(self, collection: str, series_uid: str, *, md5: bool = True,
                    hash_entries: bool = True, fresh: bool = False
                    ) -> AbstractAsyncContextManager[SeriesStream]:
        return self._open_series(collection, series_uid, md5, hash_entries, fresh)

    @asynccontextmanager
    async def _open_series(self, collection: str, series_uid: str, md5: bool,
                           hash_entries: bool, fresh: bool) -> AsyncIterator[SeriesStream]:
        place = self._place(series_uid)
        if place is not None:
            self.mapper.want_whole(series_uid)
        try:
            listed = await self._plan(collection, series_uid)
            if place is None or listed is None:
                async with self.nbia.open_series(collection, series_uid, md5=md5,
                                                 hash_entries=hash_entries,
                                                 fresh=fresh) as stream:
                    yield stream
                return
            async with self._idc_series(collection, series_uid, place, fresh,
                                        listed) as stream:
                yield stream
        finally:
            if place is not None:
                self.mapper.done_with(series_uid, place)

    async def _usable(self, found: AsyncIterator[MappedObject]
                      ) -> AsyncIterator[MappedObject]:
        """The objects found, but those that failed and, while the bucket rests, any."""
        async for obj in found:
            if not self._resting() and obj.key not in self._failed:
                yield obj

    @asynccontextmanager
    async def _idc_series(self, collection: str, series_uid: str, place: SeriesPlace,
                          fresh: bool, listed: list[str]) -> AsyncIterator[SeriesStream]:
        async with trio.open_nursery() as nursery:
            yield IdcSeriesStream(
                self._usable(self.mapper.as_found(series_uid, place, listed)), listed,
                fetch=self._fetch_whole, stream=self._stream_object,
                nbia_member=self._nbia_member(collection, series_uid, fresh),
                parallel=self.parallel, nursery=nursery, on_failure=self._bucket_failed)
            nursery.cancel_scope.cancel()

    async def _plan(self, collection: str, series_uid: str) -> list[str] | None:
        """What NBIA lists of a series IDC holds, once the bucket has shown it serves the
        series (an object mapped); None: NBIA's series stream serves it. Both are asked
        at once: each costs a round trip before the first byte."""
        place = self._place(series_uid)
        if self._resting() or place is None:
            return None
        listed: list[str] = []
        failed: list[ClientError] = []

        async def nbia_listing() -> None:
            try:
                listed.extend(i.uid for i in await self.nbia.instances(collection,
                                                                       series_uid))
            except ClientError as exc:  # raised below as itself, not in a group
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(nbia_listing)
            served = await self.mapper.any_found(series_uid, place)
        if failed:
            raise failed[0]
        return listed if served and not self._resting() else None

    async def _fetch_whole(self, obj: MappedObject) -> tuple[list[bytes], str]:
        """An object's bytes and their MD5, checked against its listing: as the pass
        that mapped it read them, or asked for now."""
        held = self.mapper.bodies.take(obj.key)
        if held is not None:
            return held
        check = ObjectCheck(obj)
        async with self.idc.s3.open(obj.bucket, obj.key) as stream:
            data = [check.take(chunk) async for chunk in stream.chunks()]
        return data, check.check()

    async def _stream_object(self, obj: MappedObject) -> AsyncIterator[bytes]:
        async with self.idc.s3.open(obj.bucket, obj.key) as stream:
            async for chunk in stream.chunks():
                yield chunk

    def _nbia_member(self, collection: str, series_uid: str, fresh: bool
                     ) -> Callable[[str], Awaitable[tuple[Member, Callable[[], Awaitable[str]]]]]:
        """How a series stream takes one instance from NBIA (getSingleImage): whole, then
        its MD5 as NBIA gives it, or as computed where NBIA gives none (a restricted
        collection's image; its length and header are checked all the same)."""

        async def member(sop: str) -> tuple[Member, Callable[[], Awaitable[str]]]:
            async with self.nbia.open_instance(collection, series_uid, sop,
                                               fresh=fresh) as stream:
                data = [chunk async for chunk in stream.chunks()]

            async def chunks() -> AsyncIterator[bytes]:
                for chunk in data:
                    yield chunk

            async def md5() -> str:
                given = await self.nbia.instance_md5(collection, series_uid, sop,
                                                     fresh=fresh)
                return given or _md5_of(data)

            return Member(sop, chunks), md5

        return member


def _md5_of(data: list[bytes]) -> str:
    digest = hashlib.md5()
    for chunk in data:
        digest.update(chunk)
    return digest.hexdigest()


def build(*, cache_dir: Path, s3_endpoint: str, idc_catalog: str | None = None,
          max_connections: int = 8, timeout: float = 30.0, **nbia_options: Any
          ) -> AutoSource:
    """The registry's entry (tciafs.sources.build("auto", ...)): NBIA's options (as the
    nbia source's build() takes them), the IDC side's endpoint and catalog, and the
    cache directory, where the object map is kept.

    ValueError when the catalog cannot be read or a URL is malformed."""
    nbia = build_nbia(max_connections=max_connections, timeout=timeout, **nbia_options)
    idc = build_idc(endpoint=s3_endpoint, catalog=idc_catalog,
                    max_connections=max_connections, timeout=timeout)
    return AutoSource(nbia, idc, ObjectMap(cache_dir / MAP_FILE), parallel=max_connections)
