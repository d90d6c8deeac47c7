"""Series made from their plans when asked for: instance records, bytes and DICOM tags.

The archives that write nothing to disk share this: `GeneratedArchive` (scale, bench),
which plans every series at start, and `PatientwiseArchive` (nlst), which plans a
patient's series only while they are in use. Each says how to find a series' plan, and
the series of an image; the rest (drawing pixels, sizes, MD5s, bytes) is here.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from cachetools import LRUCache
from pydicom.dataset import Dataset

from tciafs.emulator.dicomgen import SeriesPlan
from tciafs.emulator.model import InstanceRecord
from tciafs.emulator.records import instance_record, values_getter

#: Planes a listing holds at once (the nlst, scale and bench profiles draw two to eight).
_PLANES_HELD = 16


def slices(data: bytes, chunk_size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield bytes(view[start:start + chunk_size])


@dataclass(frozen=True)
class _Materialised:
    records: list[InstanceRecord]


class OnDemandSeries:
    """Every file made from its series' plan when asked for; nothing written to disk.

    Listing a series' instances draws its pixels, as their records carry each file's
    MD5 (`planes_drawn` counts the planes drawn, so tests can prove a listing drew
    none). Drawn planes and instance records of recent series stay in bounded LRU
    caches, whose bounds are the memory this part of an archive may hold.
    """

    def __init__(self, *, payload_cache_bytes: int = 256 << 20,
                 instance_cache_records: int = 200_000) -> None:
        self._lock = threading.Lock()
        self._payloads: LRUCache[tuple[str, int], bytes] = LRUCache(
            maxsize=payload_cache_bytes, getsizeof=len)
        self._instances: LRUCache[str, _Materialised] = LRUCache(
            maxsize=instance_cache_records, getsizeof=lambda m: max(1, len(m.records)))
        self.planes_drawn = 0

    def plan(self, series_instance_uid: str) -> SeriesPlan | None:
        """The plan of a series of this archive, or None."""
        raise NotImplementedError

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        """The UID of the series holding an image, or None."""
        raise NotImplementedError

    def _payload(self, plan: SeriesPlan, i: int) -> bytes:
        if not plan.payload_size:
            return b""
        key = (plan.series_uid, plan.plane_index(i))
        with self._lock:
            cached = self._payloads.get(key)
        if cached is not None:
            return cached
        payload = plan.render_payload(i)
        with self._lock:
            self.planes_drawn += plan.frames
            if len(payload) <= self._payloads.maxsize:
                self._payloads[key] = payload
        return payload

    def _planes(self, plan: SeriesPlan) -> list[bytes] | None:
        """The series' distinct planes, in plane order, where they are few enough to
        hold while its instances are listed (None: ask `_payload` an instance at a time)."""
        if plan.distinct_planes > _PLANES_HELD:
            return None
        return [self._payload(plan, j) for j in range(plan.distinct_planes)]

    def _materialise(self, plan: SeriesPlan) -> _Materialised:
        # Runs once an instance of every series listed (getSOPInstanceUIDs orders its
        # answer by MD5): the planes are looked up once a series, not once an instance.
        records, total = [], 0
        planes = self._planes(plan)
        for i in range(plan.count):
            values = plan.instance_values(i)
            header = plan.header(i, values)
            payload = (planes[plan.plane_index(i)] if planes is not None
                       else self._payload(plan, i))
            md5 = hashlib.md5(header)
            md5.update(payload)
            size = len(header) + len(payload)
            total += size
            header_values = {**plan.values, **values}  # the instance's own values win
            records.append(instance_record(values_getter(header_values), size,
                                           md5.hexdigest()))
        if total != plan.file_size():  # the listings promised plan.file_size(); never lie
            raise AssertionError(f"size mismatch in {plan.series_uid}")
        return _Materialised(records)

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        plan = self.plan(series_instance_uid)
        if plan is None:
            return []
        with self._lock:
            done = self._instances.get(series_instance_uid)
        if done is None:
            done = self._materialise(plan)
            with self._lock:
                self._instances[series_instance_uid] = done
        return list(done.records)

    def _locate(self, series_uid: str, sop_uid: str) -> tuple[SeriesPlan, int] | None:
        plan = self.plan(series_uid)
        i = plan.index_of(sop_uid) if plan else None
        return None if plan is None or i is None else (plan, i)

    def instance_bytes(self, series_instance_uid: str, sop_instance_uid: str) -> bytes | None:
        found = self._locate(series_instance_uid, sop_instance_uid)
        if found is None:
            return None
        plan, i = found
        return plan.header(i) + self._payload(plan, i)

    def iter_instance_chunks(self, series_instance_uid: str, sop_instance_uid: str,
                             chunk_size: int = 65536) -> Iterator[bytes]:
        found = self._locate(series_instance_uid, sop_instance_uid)
        if found is None:
            return
        plan, i = found
        yield from slices(plan.header(i), chunk_size)
        yield from slices(self._payload(plan, i), chunk_size)

    def dicom_tags(self, series_instance_uid: str) -> Dataset | None:
        plan = self.plan(series_instance_uid)
        if plan is None:
            return None
        # The header alone ends at the Pixel Data element: nothing to draw.
        return pydicom.dcmread(io.BytesIO(plan.header(0)), stop_before_pixels=True)
