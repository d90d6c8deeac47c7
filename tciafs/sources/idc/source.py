"""IdcSource: the NCI Imaging Data Commons as a tciafs source.

Listings above a series come from the pinned catalog (tciafs.sources.idc.catalog), with
no request. A series' files are one ListObjectsV2 of `<crdc_series_uuid>/` in its bucket,
which also gives each object's exact size. Bytes are anonymous GETs, ranged when asked.

Leaf names: an instance is named by its object's UUID, the key without the series prefix
and the `.dcm` suffix (`<crdc_series_uuid>/<uuid>.dcm` -> `<uuid>`). A SOP Instance UID
is unknown until the file's header is read, and an IDC object never changes (a new
version gets a new UUID), so the name never changes once listed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from tciafs.sources.base import (
    Capabilities,
    ClientError,
    Collection,
    CollectionFacts,
    Instance,
    InstanceStream,
    NotFound,
    Patient,
    Series,
    SeriesStream,
    Study,
)

from . import catalog as idc_catalog
from .http import S3Stats
from .s3 import AWS_ENDPOINT, S3Client

SUFFIX = ".dcm"


def leaf_name(key: str, prefix: str) -> str:
    """The instance's name from its object key (the module's docstring tells why)."""
    name = key[len(prefix):] if key.startswith(prefix) else key
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


class IdcSource:
    """The Source protocol (tciafs.sources.base) over IDC's catalog and buckets."""

    name = "idc"
    capabilities = Capabilities(known_sizes=True, ranges=True, series_streams=False,
                                series_checksums=False, auth=False,
                                names_are_sop_uids=False)

    def __init__(self, catalog: idc_catalog.IdcCatalog, s3: S3Client) -> None:
        self.catalog = catalog
        self.s3 = s3
        # Each listed object's size, by key: an answer must agree with it. A series
        # listed by an earlier mount (its files stored in the catalog) has none here,
        # and its answers are taken at their word, as before.
        self._sizes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"IdcSource({self.s3.endpoint!r}, {len(self.catalog)} series)"

    # -- lifecycle: nothing to log in to, nothing running in the background ---------------

    async def start(self) -> None:
        pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()

    async def become_guest(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.s3.aclose()

    async def __aenter__(self) -> IdcSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def stats(self) -> S3Stats:
        return self.s3.stats

    @property
    def unreachable(self) -> Mapping[str, Mapping[str, object]]:
        return {}

    def traffic(self) -> dict[str, int]:
        return {self.name: self.s3.stats.bytes_received}

    @property
    def catalog_version(self) -> str | None:
        """The idc-index-data version the catalog's files carry, for `tciafs status`."""
        return self.catalog.version

    # -- listings, from the catalog ------------------------------------------------------

    def remember_collections(self, stored: Iterable[Collection]) -> None:
        pass  # one endpoint: nothing to route

    def collection_named(self, name: str) -> Collection:
        return Collection(name)

    async def collections(self, stored: Sequence[Collection] = ()) -> list[Collection]:
        return [Collection(name) for name in self.catalog.collection_names()]

    async def patients(self, collection: str) -> list[Patient]:
        return self.catalog.patients_of(collection)

    async def studies(self, collection: str, patient_id: str | None = None) -> list[Study]:
        return self.catalog.studies_of(collection, patient_id)

    async def series(self, collection: str, patient_id: str | None = None) -> list[Series]:
        return self.catalog.series_of(collection, patient_id)

    async def series_by_uid(self, series_uid: str) -> list[Series]:
        found = self.catalog.series_by_uid(series_uid)
        return [] if found is None else [found]

    async def cart(self, name: str) -> list[Series]:
        raise ClientError(f"shared cart {name!r}: IDC has no shared carts (they are NBIA's)")

    def collection_facts(self, collection: str) -> CollectionFacts:
        return self.catalog.facts.get(collection, CollectionFacts(
            archive="NCI Imaging Data Commons (IDC)"))

    # -- the bucket ----------------------------------------------------------------------

    def _place(self, series_uid: str) -> idc_catalog.SeriesPlace:
        place = self.catalog.place(series_uid)
        if place is None:
            raise NotFound(f"series {series_uid} is not in the IDC catalog")
        return place

    async def instances(self, collection: str, series_uid: str) -> list[Instance]:
        place = self._place(series_uid)
        objects = [o for o in await self.s3.list_objects(place.bucket, place.prefix)
                   if not o.key.endswith("/")]
        self._sizes.update((f"{place.bucket}/{o.key}", o.size) for o in objects)
        return [Instance(leaf_name(o.key, place.prefix), o.size) for o in objects]

    def open_instance(self, collection: str, series_uid: str, sop_uid: str, *,
                      byte_range: tuple[int, int] | None = None, fresh: bool = False
                      ) -> AbstractAsyncContextManager[InstanceStream]:
        # `sop_uid` is the listed name: the object's UUID. `fresh` asks nothing more of
        # S3: no shared cache stands between, and an object never changes.
        place = self._place(series_uid)
        return self._open(place.bucket, f"{place.prefix}{sop_uid}{SUFFIX}", byte_range)

    @asynccontextmanager
    async def _open(self, bucket: str, key: str, byte_range: tuple[int, int] | None
                    ) -> AsyncIterator[InstanceStream]:
        async with self.s3.open(bucket, key, byte_range,
                                listed_size=self._sizes.get(f"{bucket}/{key}")) as stream:
            yield stream

    async def instance_md5(self, collection: str, series_uid: str, sop_uid: str, *,
                           fresh: bool = False) -> str | None:
        """None: the buckets promise no MD5 of an object (an ETag is one only for objects
        uploaded whole), so `instance_checksums` is off."""
        return None

    def open_series(self, collection: str, series_uid: str, *, md5: bool = True,
                    hash_entries: bool = True, fresh: bool = False
                    ) -> AbstractAsyncContextManager[SeriesStream]:
        raise ValueError("IDC has no series streams: its files come one object at a time")


def build(*, endpoint: str = AWS_ENDPOINT, catalog: str | None = None,
          **options: Any) -> IdcSource:
    """The registry's entry (tciafs.sources.build("idc", ...)): the S3 endpoint, the
    catalog's location (a path or URL of idc_index.parquet; default the installed
    idc-index-data's), and S3Client's options (max_connections, timeout).

    ValueError when the catalog cannot be read."""
    try:
        loaded = idc_catalog.load(catalog)
    except idc_catalog.CatalogError as exc:
        raise ValueError(str(exc)) from None
    return IdcSource(loaded, S3Client(endpoint, **options))
