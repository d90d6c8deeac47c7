"""Archive queries as NBIA's SQL answers them: filters, visibility, carts and dates.

Visibility: a collection is served by the server whose ``host`` it names; restricted
collections are visible to users granted them; v1 is always the guest.  A patient or
study is listed when its collection is visible.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from tciafs.emulator.context import Call, Context
from tciafs.emulator.model import (
    Archive,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.wire import SeriesView

# --- filters -------------------------------------------------------------------------------

def ci_eq(value: str | None, wanted: str | None) -> bool:
    """A filter as MySQL applies it: absent = no filter, NULL never matches."""
    return wanted is None or (value is not None and value.upper() == wanted.upper())


def uid_match(value: str, wanted: str | None, ci: bool) -> bool:
    """A UID filter: absent = no filter; v4 upper-cases both sides (`ci`)."""
    if wanted is None:
        return True
    return value.upper() == wanted.upper() if ci else value == wanted


@dataclass(frozen=True)
class SeriesFilter:
    collection: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    uid_ci: bool = False  # v4 upper-cases both sides of UID comparisons

    def matches(self, s: SeriesRecord) -> bool:
        return (ci_eq(s.collection, self.collection) and ci_eq(s.patient_id, self.patient_id)
                and uid_match(s.study_instance_uid, self.study_uid, self.uid_ci)
                and uid_match(s.series_instance_uid, self.series_uid, self.uid_ci)
                and ci_eq(s.modality, self.modality) and ci_eq(s.body_part_examined,
                                                               self.body_part)
                and ci_eq(s.manufacturer, self.manufacturer)
                and ci_eq(s.manufacturer_model_name, self.model))


# --- visible series, patients, instances ---------------------------------------------------

def collections_for(call: Call) -> frozenset[str]:
    """The collections an endpoint that authorises its caller may show."""
    return call.ctx.public if call.api == "v1" else call.visible


def select_series(archive: Archive, allowed: frozenset[str], flt: SeriesFilter
                  ) -> list[SeriesRecord]:
    uid = flt.series_uid
    # UIDs hold no letters, so an exact look-up is also the case-insensitive one unless
    # the caller sent letters (only v4 then needs the full scan).
    if uid is not None and not (flt.uid_ci and uid.upper() != uid.lower()):
        one = archive.series_by_uid(uid)
        candidates = [one] if one is not None else []
    else:
        # "" filters to nothing, so only a real value may narrow the archive query.
        candidates = archive.series(collection=flt.collection or None,
                                    patient_id=flt.patient_id or None)
    return [s for s in candidates if s.collection in allowed and flt.matches(s)]


def visible_series(archive: Archive, allowed: frozenset[str], uid: str,
                   uid_ci: bool = False) -> SeriesRecord | None:
    found = select_series(archive, allowed, SeriesFilter(series_uid=uid, uid_ci=uid_ci))
    return found[0] if found else None


def distinct_values(call: Call, flt: SeriesFilter, attr: str) -> list[str | None]:
    """The distinct values of a series attribute, NULL first, as get*Values sorts them."""
    series = select_series(call.archive, collections_for(call), flt)
    raw = [getattr(s, attr) for s in series]
    values = {None if v is None else (v.upper() if call.v4 else v) for v in raw}
    return sorted(values, key=lambda v: (v is not None, (v or "").upper(), v or ""))


def visible_patients(call: Call, allowed: frozenset[str], collection: str | None,
                     patient_id: str | None = None) -> list[PatientRecord]:
    # "" filters to nothing, so only a real value may narrow the archive query.
    patients = call.archive.patients(collection or None, patient_id or None)
    return [p for p in patients if p.collection in allowed and ci_eq(p.collection, collection)
            and ci_eq(p.patient_id, patient_id)]


def cart_series(call: Call, name: str) -> list[SeriesRecord]:
    """The public series of a shared cart (:data:`tciafs.emulator.context.CARTS`)."""
    uids = call.ctx.carts.get(name, [])
    found = (visible_series(call.archive, call.ctx.public, uid) for uid in uids)
    return [s for s in found if s is not None]


def find_instance(archive: Archive, series: SeriesRecord | None, sop: str
                  ) -> InstanceRecord | None:
    if series is None:
        return None
    found = [i for i in archive.instances(series.series_instance_uid)
             if i.sop_instance_uid == sop]
    return found[0] if found else None


class Views:
    """Patient and study look-ups for series rows, loaded once per patient: a listing
    names few patients, and a collection may hold tens of thousands."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._patients: dict[tuple[str, str], PatientRecord | None] = {}
        self._studies: dict[str, StudyRecord] = {}

    def _load(self, collection: str, patient_id: str) -> PatientRecord | None:
        key = (collection, patient_id)
        if key not in self._patients:
            archive = self._ctx.archive
            found = [p for p in archive.patients(collection, patient_id)
                     if p.collection == collection and p.patient_id == patient_id]
            self._patients[key] = found[0] if found else None
            for st in archive.studies(collection, patient_id):
                self._studies.setdefault(st.study_instance_uid, st)
        return self._patients[key]

    def patient(self, collection: str, patient_id: str) -> PatientRecord | None:
        return self._load(collection, patient_id)

    def study(self, collection: str, patient_id: str, uid: str) -> StudyRecord | None:
        self._load(collection, patient_id)
        return self._studies.get(uid)

    def of(self, s: SeriesRecord) -> SeriesView:
        facts = self._ctx.facts(s.collection)
        assert facts is not None, f"series {s.series_instance_uid} has no collection facts"
        return SeriesView(s, self.study(s.collection, s.patient_id, s.study_instance_uid),
                          self.patient(s.collection, s.patient_id), facts)


# --- date parameters -------------------------------------------------------------------------

_SLASHED = re.compile(r"^\s*(\d+)/(\d+)/(\d+)")
_DASHED = re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{1,4})")
_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")


def _lenient(year: int, month: int, day: int) -> dt.date | None:
    """java.text.SimpleDateFormat in lenient mode: month 13 is January of next year."""
    try:
        first = dt.date(year + (month - 1) // 12, (month - 1) % 12 + 1, 1)
        return first + dt.timedelta(days=day - 1)
    except (ValueError, OverflowError):
        return None


def parse_yyyy_mm_dd(text: str) -> dt.date | None:
    """``new SimpleDateFormat("yyyy/MM/dd").parse`` (v1/v2 ``Date``)."""
    m = _SLASHED.match(text)
    return _lenient(int(m[1]), int(m[2]), int(m[3])) if m else None


def parse_dd_mm_yyyy(text: str) -> dt.date | None:
    """``new SimpleDateFormat("dd/MM/yyyy").parse`` (v1/v2 getUpdatedSeries)."""
    m = _SLASHED.match(text)
    return _lenient(int(m[3]), int(m[2]), int(m[1])) if m else None


def parse_mm_dd_yyyy(text: str) -> dt.date | None:
    """MySQL ``STR_TO_DATE(x, '%m-%d-%Y')``: invalid dates are NULL."""
    m = _DASHED.match(text)
    try:
        return dt.date(int(m[3]), int(m[1]), int(m[2])) if m else None
    except ValueError:
        return None


def parse_iso(text: str) -> dt.date | None:
    m = _ISO.match(text.strip())
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3])) if m else None
    except ValueError:
        return None
