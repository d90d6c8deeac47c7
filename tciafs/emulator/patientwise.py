"""An archive of drawn collections, planned one patient at a time (the `nlst` profile).

`GeneratedArchive` plans every series at start and keeps every record; at NLST's size
(203,000 series) that would take minutes and gigabytes. Here nothing is planned at
start. A listing of one patient, or a look-up of one series or image by UID, draws and
plans that patient alone (every UID of a drawn collection names its patient); a bounded
LRU keeps the patients in use. Only a query over a whole collection's studies or series
(no patient named) draws every patient, one after another: it is slow, as it is on the
real service, but its memory is the answer's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cachetools import LRUCache

from tciafs.emulator.dicomgen import SeriesPlan, patient_values, plan_patient
from tciafs.emulator.model import CollectionFacts, PatientRecord, SeriesRecord, StudyRecord
from tciafs.emulator.ondemand import OnDemandSeries
from tciafs.emulator.profiles import DrawnCollection, Profile
from tciafs.emulator.records import Records, patient_record, values_getter


@dataclass(frozen=True)
class _Planned:
    """One patient, drawn and planned: its records and the plans of its series."""

    records: Records
    plans: dict[str, SeriesPlan]
    series_by_uid: dict[str, SeriesRecord]


class PatientwiseArchive(OnDemandSeries):
    """The `Archive` of a profile's drawn collections (`Profile.drawn`).

    The caches bound its memory: `patients_cached` planned patients (tens of KB each),
    the `OnDemandSeries` caches of drawn planes and instance records, and the ZIPs each
    server keeps for replay (`zip_cache_bytes`, read by the server).
    """

    zip_cache_bytes = 16 << 20

    def __init__(self, profile: Profile, *, patients_cached: int = 256,
                 payload_cache_bytes: int = 16 << 20,
                 instance_cache_records: int = 20_000) -> None:
        super().__init__(payload_cache_bytes=payload_cache_bytes,
                         instance_cache_records=instance_cache_records)
        self.profile = profile
        self._drawn = {c.facts.name.upper(): c for c in profile.drawn}
        self.collections: dict[str, CollectionFacts] = {
            c.facts.name: c.facts for c in profile.drawn}
        self._planned: LRUCache[tuple[str, int], _Planned] = LRUCache(patients_cached)
        self._planned_lock = threading.Lock()

    # -- drawing ------------------------------------------------------------------------

    def _chosen(self, collection: str | None) -> list[DrawnCollection]:
        if collection is None:
            return list(self._drawn.values())
        found = self._drawn.get(collection.upper())
        return [found] if found is not None else []

    @staticmethod
    def _indices(coll: DrawnCollection, patient_id: str | None) -> Iterable[int]:
        if patient_id is None:
            return range(coll.size)
        index = coll.index_of(patient_id.upper())
        return () if index is None else (index,)

    def _plan_patient(self, coll: DrawnCollection, index: int) -> _Planned:
        key = (coll.facts.name, index)
        with self._planned_lock:
            found = self._planned.get(key)
        if found is not None:
            return found
        records = Records()
        plans = plan_patient(self.profile.seed, coll.facts.name, coll.patient(index),
                             uid=coll.uid)
        for plan in plans:
            records.add(coll.facts, values_getter(plan.header_values(0)), plan.count,
                        plan.file_size())
        planned = _Planned(records, {p.series_uid: p for p in plans},
                           {s.series_instance_uid: s for s in records.series})
        with self._planned_lock:
            self._planned[key] = planned
        return planned

    def _each(self, collection: str | None, patient_id: str | None) -> Iterator[_Planned]:
        for coll in self._chosen(collection):
            for index in self._indices(coll, patient_id):
                yield self._plan_patient(coll, index)

    def _owner(self, uid: str) -> _Planned | None:
        """The planned patient a UID names, if any (the UID itself is not checked)."""
        for coll in self._drawn.values():
            index = coll.owner(uid)
            if index is not None:
                return self._plan_patient(coll, index)
        return None

    # -- the Archive protocol -----------------------------------------------------------

    def patients(self, collection: str | None = None, patient_id: str | None = None
                 ) -> list[PatientRecord]:
        # A patient's own facts need no plan: listing all 26,410 draws no series.
        return [patient_record(coll.facts.name, values_getter(patient_values(coll.person(i))))
                for coll in self._chosen(collection) for i in self._indices(coll, patient_id)]

    def studies(self, collection: str | None = None, patient_id: str | None = None
                ) -> list[StudyRecord]:
        return [s for p in self._each(collection, patient_id) for s in p.records.studies]

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_instance_uid: str | None = None) -> list[SeriesRecord]:
        return [s for p in self._each(collection, patient_id) for s in p.records.series
                if study_instance_uid is None or s.study_instance_uid == study_instance_uid]

    def series_by_uid(self, series_instance_uid: str) -> SeriesRecord | None:
        owner = self._owner(series_instance_uid)
        return owner.series_by_uid.get(series_instance_uid) if owner else None

    def plan(self, series_instance_uid: str) -> SeriesPlan | None:
        owner = self._owner(series_instance_uid)
        return owner.plans.get(series_instance_uid) if owner else None

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        owner = self._owner(sop_instance_uid)
        plans = owner.plans.values() if owner else ()
        return next((p.series_uid for p in plans if p.index_of(sop_instance_uid) is not None),
                    None)
