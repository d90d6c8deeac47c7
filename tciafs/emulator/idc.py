"""The IDC side of an archive: which series its S3 buckets hold, and under which keys.

IDC stores each instance as one object, `<crdc_series_uuid>/<crdc_instance_uuid>.dcm`,
in one of three public buckets. Here the UUIDs are derived from the DICOM UIDs (UUID
version 5 in a namespace of the emulator's own), so they are stable across runs and
machines, and a key never names other bytes. Which series are in a bucket follows the
profile's `IdcSpec` (tciafs/emulator/profiles.py): most series are in both archives, a
few only in NBIA, and a few only here.

A series' objects (keys, sizes, MD5s) are worked out the first time a request needs
them: for the on-demand profiles that means drawing the series, which a listing of
the collections or the catalog never does.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass

from tciafs.emulator.model import Archive, CollectionFacts, SeriesRecord
from tciafs.emulator.profiles import (
    BUCKETS,
    AnalysisResult,
    IdcSpec,
    Profile,
    SeriesRef,
)
from tciafs.emulator.uids import UID_ROOT

#: The namespace of every crdc UUID the emulator makes.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, UID_ROOT.rstrip("."))


def series_uuid(series_instance_uid: str) -> str:
    """The crdc_series_uuid of a series: the first part of each of its keys."""
    return str(uuid.uuid5(NAMESPACE, f"series:{series_instance_uid}"))


def instance_uuid(sop_instance_uid: str) -> str:
    """The crdc_instance_uuid of an instance: its object's name within the series."""
    return str(uuid.uuid5(NAMESPACE, f"instance:{sop_instance_uid}"))


@dataclass(frozen=True)
class BucketSeries:
    """One series as IDC holds it."""

    bucket: str
    uuid: str  # crdc_series_uuid
    record: SeriesRecord
    facts: CollectionFacts
    archive: Archive  # the archive that makes its bytes
    analysis: AnalysisResult | None = None
    in_nbia: bool = True

    @property
    def prefix(self) -> str:
        return f"{self.uuid}/"


@dataclass(frozen=True)
class StoredObject:
    """One object of a bucket: one instance of a series."""

    key: str
    size: int
    md5: str  # lowercase hex: the ETag of an object stored in one piece
    sop_instance_uid: str
    series: BucketSeries

    @property
    def last_modified(self) -> dt.datetime:
        """When it was stored: the series' submission time, read as UTC."""
        return self.series.record.max_submission_timestamp.replace(tzinfo=dt.UTC)


class Holdings:
    """The three buckets and what they hold; safe to use from many threads."""

    def __init__(self, series: list[BucketSeries]) -> None:
        self.buckets: dict[str, dict[str, BucketSeries]] = {name: {} for name in BUCKETS}
        for item in sorted(series, key=lambda s: s.uuid):
            self.buckets[item.bucket][item.uuid] = item
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, StoredObject]] = {}  # series uuid -> key -> object

    def series(self) -> list[BucketSeries]:
        """Every series of every bucket, buckets in name order, series by UUID."""
        return [s for name in sorted(self.buckets) for s in self.buckets[name].values()]

    def series_in(self, bucket: str) -> list[BucketSeries]:
        """A bucket's series in key order (their UUIDs)."""
        return list(self.buckets[bucket].values())

    def objects(self, series: BucketSeries) -> list[StoredObject]:
        """The series' objects in key order."""
        return list(self._objects_of(series).values())

    def find(self, bucket: str, key: str) -> StoredObject | None:
        folder, _, _name = key.partition("/")
        series = self.buckets.get(bucket, {}).get(folder)
        return None if series is None else self._objects_of(series).get(key)

    def _objects_of(self, series: BucketSeries) -> dict[str, StoredObject]:
        with self._lock:
            done = self._objects.get(series.uuid)
        if done is not None:
            return done
        # Outside the lock: drawing a series may take a while, and doing it twice is safe.
        made = sorted((StoredObject(f"{series.prefix}{instance_uuid(i.sop_instance_uid)}.dcm",
                                    i.size, i.md5, i.sop_instance_uid, series)
                       for i in series.archive.instances(series.record.series_instance_uid)),
                      key=lambda o: o.key)
        objects = {o.key: o for o in made}
        with self._lock:
            return self._objects.setdefault(series.uuid, objects)


def _ref(record: SeriesRecord) -> SeriesRef:
    return SeriesRef(record.collection, record.patient_id, record.series_description or "")


def _extras(profile: Profile | None, spec: IdcSpec) -> Archive | None:
    """The archive of the series only IDC holds, made on demand with the profile's seed."""
    if profile is None or not spec.idc_only:
        return None
    from tciafs.emulator.archive import GeneratedArchive  # the generator; only when needed

    return GeneratedArchive(Profile(f"{profile.name}-idc", seed=profile.seed,
                                    collections=spec.idc_only, on_disk=False))


def holdings_for(archive: Archive) -> Holdings:
    """What IDC holds of `archive`, by its profile's IdcSpec (the default rule when the
    archive has no profile or the profile no spec)."""
    profile: Profile | None = getattr(archive, "profile", None)
    spec = (profile.idc if profile is not None else None) or IdcSpec()
    held: list[BucketSeries] = []
    seen: set[str] = set()

    def add(source: Archive, record: SeriesRecord, in_nbia: bool) -> None:
        facts = source.collections[record.collection]
        ref = _ref(record)
        if facts.restricted or ref in spec.nbia_only or record.series_instance_uid in seen:
            return
        seen.add(record.series_instance_uid)
        held.append(BucketSeries(spec.bucket_of(record.collection),
                                 series_uuid(record.series_instance_uid), record, facts,
                                 source, spec.analysis_result_of(ref), in_nbia))

    for record in archive.series():
        add(archive, record, in_nbia=True)
    extras = _extras(profile, spec)
    if extras is not None:
        for record in extras.series():
            add(extras, record, in_nbia=False)
    return Holdings(held)
