"""The NBIA emulator's HTTP server: routing, authorisation, every endpoint, streaming.

Paths (all case-sensitive, as JAX-RS is):

* ``/nbia-api/services/{v1,v2,v4}/<endpoint>`` and the unversioned "Advanced"
  ``/nbia-api/services/<endpoint>`` (getDicomTags, getCollectionDescriptions,
  get*ValuesAndCounts), see :data:`NBIA`.
* ``/nbia-api/oauth/token``, ``/nbia-api/services/oauth/token``, ``/nbia-api/logout``.
* The legacy Bindaas API ``/services/v4/TCIA/query/<endpoint>`` (no key) and
  ``/services/v3/TCIA/query/<endpoint>`` (``api_key`` header or parameter), see
  :data:`LEGACY`.
* ``/_emulator/{stats,reset,faults}`` (see :mod:`tciafs.emulator.faults`).

Any other path under ``/nbia-api/`` is Jersey's 404 turned into a 500 by NBIA's
catch-all mapper; a wrong method is its 405, likewise a 500.  Paths outside
``/nbia-api``, ``/services`` and ``/_emulator`` get a plain 404.

Choices where the reference is silent:

* Visibility: a collection is served by the server whose ``host`` it names.  Restricted
  collections are visible to users granted them.  v1 is always the guest.  As in NBIA,
  getUpdatedSeries, v1 getSeriesSize, v4 getSeriesSize and getContentsByName use only the
  public collections; v4 getSOPInstanceUIDs does no authorisation at all.
* A patient or study is listed when its collection is visible; studies only when they
  hold a visible series (SeriesCount counts visible series).
* Release dates are per collection (``CollectionFacts.date_released``).
* ValuesAndCounts count distinct patients; NULL values are not listed.
* v4 getSeriesMetadata with no visible series answers 200 with an empty body (the
  NBIA source routes an empty result through formatResponse), in CSV and in JSON.
* Unknown series in v1/v2 getSeriesSize: ``[{}]`` (the aggregate row of NULLs).
* getDicomTags without SeriesUID: 400 ``A parameter, SeriesUID, is required for this
  API call.``; DICOM binary values (OB/OW/UN/...) have ``data: null``.
* getCollectionDescriptions: ``id`` is the 1-based position of the collection in name
  order, ``licenseId`` the 1-based position of its license, ``userName`` "nbia_admin".
* Expired or unknown tokens (``--expired-token-mode swallow``, the default) give
  401 + empty body on getImage, getImageWithMD5Hash, getSingleImage,
  getCollectionValues, getSeriesMetaData/getSeriesMetadata, ValuesAndCounts and root
  getCollectionDescriptions; 500 on getDicomTags; 200 + empty body everywhere else.
  ``--expired-token-mode 401`` answers 401 + empty body everywhere.
* Shared carts (:data:`CARTS`) are derived from the archive.
* Legacy API: JSON by default (``format`` json|csv|xml|html as in NBIA), empty results
  as in NBIA (200, empty body), the old key spellings (``PatientID``, ``TimeStamp``…),
  dates ``YYYY-MM-DD``, ``Date=YYYY-MM-DD`` for the New* endpoints (strictly after),
  getSeriesSize's ``TotalSizeInBytes`` a string such as ``"1234.0"``, getImage a ZIP of
  ``<SOPInstanceUID>.dcm`` files without LICENSE.  Missing required parameters: 400
  ``Missing required parameter(s): …``; unknown series or image: 404 ``Not Found``;
  a missing or wrong v3 key: 401 ``Invalid or missing api_key``.
* The token endpoint and logout are faulted like any NBIA endpoint (filter with
  ``endpoints`` to spare them).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import fcntl
import json
import re
import socket
import socketserver
import struct
import sys
import termios
import threading
import time
import traceback
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tciafs.emulator import wire, zipstream
from tciafs.emulator.auth import GUEST, Auth, Identity, TokenStore, UserDB
from tciafs.emulator.faults import Damage, FaultConfig, FaultPlan, Faults, Stats, damaged
from tciafs.emulator.model import (
    Archive,
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.wire import Reply, SeriesView

SERVICES = "/nbia-api/services/"
TOKEN_PATHS = ("/nbia-api/oauth/token", "/nbia-api/services/oauth/token")
LOGOUT_PATH = "/nbia-api/logout"
LEGACY_RE = re.compile(r"^/services/(v3|v4)/TCIA/query/([^/]+)$")
NOT_FOUND = "HTTP 404 Not Found"
NPE = "java.lang.NullPointerException"

#: Shared carts served by getContentsByName (v1/v2) and legacy ContentsByName.
CARTS: dict[str, str] = {
    "nbia-demo-cart": "the first series of every public collection of the server, "
                      "collections in name order",
    "nbia-first-patient-cart": "every series of the first patient of the first public "
                               "collection (name order) of the server",
}

V1_DENIED = "Image with given SeriesInstanceUID,{uid}, is not in public domain."
DENIED = ("The user has not been granted the access to image with given SeriesInstanceUID,"
          "{uid}. Please contact System Admin to resolve this issue.")
NEED_SERIES = "A parameter, SeriesInstanceUID is required for this API call."
NEED_SERIES_COMMA = "A parameter, SeriesInstanceUID, is required for this API call."
NEED_DATE = "A parameter, Collection and Date are required for this API call."


# --- request, context, call --------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def f(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None

    def merged(self) -> dict[str, str]:
        """Query and form fields, first value of each (form wins)."""
        merged = {k: v[0] for k, v in self.query.items() if v}
        merged.update({k: v[0] for k, v in self.form.items() if v})
        return merged


@dataclass
class Context:
    """What one server (main or NLST) shares with every request it handles."""

    archive: Archive
    host: str  # "main" or "nlst": the CollectionFacts.host this server holds
    auth: Auth
    faults: Faults
    stats: Stats
    expired_mode: str = "swallow"
    verbose: bool = False
    bodies: zipstream.BodyCache = field(default_factory=zipstream.BodyCache)

    @cached_property
    def collections(self) -> dict[str, CollectionFacts]:
        return {f.name: f for f in self.archive.collections.values() if f.host == self.host}

    @cached_property
    def by_upper(self) -> dict[str, CollectionFacts]:
        return {name.upper(): f for name, f in self.collections.items()}

    @cached_property
    def public(self) -> frozenset[str]:
        return frozenset(n for n, f in self.collections.items() if not f.restricted)

    def visible_to(self, username: str | None) -> frozenset[str]:
        restricted = {n for n, f in self.collections.items() if f.restricted}
        return self.public | frozenset(self.auth.users.granted(username, restricted))

    def facts(self, collection: str) -> CollectionFacts | None:
        return self.collections.get(collection) or self.by_upper.get(collection.upper())

    @cached_property
    def carts(self) -> dict[str, list[str]]:
        return _build_carts(self)


@dataclass
class Call:
    ctx: Context
    req: Request
    api: str  # v1 | v2 | v4 | root | legacy-v3 | legacy-v4
    username: str = GUEST

    @property
    def archive(self) -> Archive:
        return self.ctx.archive

    @property
    def v4(self) -> bool:
        return self.api in ("v4", "root")

    @cached_property
    def visible(self) -> frozenset[str]:
        return self.ctx.visible_to(self.username)

    def q(self, name: str) -> str | None:
        return self.req.q(name)

    def views(self) -> Views:
        return Views(self.ctx)


# --- archive queries ---------------------------------------------------------------------

def ci_eq(value: str | None, wanted: str | None) -> bool:
    """A filter as MySQL applies it: absent = no filter, NULL never matches."""
    return wanted is None or (value is not None and value.upper() == wanted.upper())


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
                and self._uid(s.study_instance_uid, self.study_uid)
                and self._uid(s.series_instance_uid, self.series_uid)
                and ci_eq(s.modality, self.modality) and ci_eq(s.body_part_examined,
                                                               self.body_part)
                and ci_eq(s.manufacturer, self.manufacturer)
                and ci_eq(s.manufacturer_model_name, self.model))

    def _uid(self, value: str, wanted: str | None) -> bool:
        if wanted is None:
            return True
        return value.upper() == wanted.upper() if self.uid_ci else value == wanted


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


class Views:
    """Patient and study look-ups for series rows, loaded once per collection."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._patients: dict[tuple[str, str], PatientRecord] = {}
        self._studies: dict[str, StudyRecord] = {}
        self._loaded: set[str] = set()

    def _load(self, collection: str) -> None:
        if collection in self._loaded:
            return
        self._loaded.add(collection)
        archive = self._ctx.archive
        for p in archive.patients(collection):
            self._patients[(p.collection, p.patient_id)] = p
        for st in archive.studies(collection):
            self._studies[st.study_instance_uid] = st

    def patient(self, collection: str, patient_id: str) -> PatientRecord | None:
        self._load(collection)
        return self._patients.get((collection, patient_id))

    def study(self, collection: str, uid: str) -> StudyRecord | None:
        self._load(collection)
        return self._studies.get(uid)

    def of(self, s: SeriesRecord) -> SeriesView:
        facts = self._ctx.facts(s.collection)
        assert facts is not None, f"series {s.series_instance_uid} has no collection facts"
        return SeriesView(s, self.study(s.collection, s.study_instance_uid),
                          self.patient(s.collection, s.patient_id), facts)


def visible_patients(call: Call, allowed: frozenset[str], collection: str | None,
                     patient_id: str | None = None) -> list[PatientRecord]:
    patients = call.archive.patients(collection or None)
    return [p for p in patients if p.collection in allowed and ci_eq(p.collection, collection)
            and ci_eq(p.patient_id, patient_id)]


# --- date parameters -----------------------------------------------------------------------

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


# --- metadata endpoints ------------------------------------------------------------------

def _collections_for(call: Call) -> frozenset[str]:
    return call.ctx.public if call.api == "v1" else call.visible


def get_collection_values(call: Call) -> Reply:
    names = sorted(_collections_for(call), key=str.upper if call.v4 else None)
    return wire.format_values(call.q("format"), "Collection", names)


def _distinct_values(call: Call, flt: SeriesFilter, attr: str) -> list[str | None]:
    series = select_series(call.archive, _collections_for(call), flt)
    raw = [getattr(s, attr) for s in series]
    values = {None if v is None else (v.upper() if call.v4 else v) for v in raw}
    return sorted(values, key=lambda v: (v is not None, (v or "").upper(), v or ""))


def get_modality_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), body_part=call.q("BodyPartExamined"))
    values = _distinct_values(call, flt, "modality")
    return wire.format_values(call.q("format"), "Modality", values)


def get_body_part_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), modality=call.q("Modality"))
    values = _distinct_values(call, flt, "body_part_examined")
    return wire.format_values(call.q("format"), "BodyPartExamined", values)


def get_manufacturer_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), modality=call.q("Modality"),
                       body_part=call.q("BodyPartExamined"))
    values = _distinct_values(call, flt, "manufacturer")
    return wire.format_values(call.q("format"), "Manufacturer", values)


def _patient_rows(call: Call, patients: Iterable[PatientRecord]) -> Reply:
    columns = wire.PATIENT_V4 if call.v4 else wire.PATIENT_V1
    rows = [wire.patient_row(p, call.v4) for p in patients]
    return wire.format_rows(call.q("format"), columns, rows)


def get_patient(call: Call) -> Reply:
    patients = visible_patients(call, _collections_for(call), call.q("Collection"),
                                call.q("PatientId"))
    return _patient_rows(call, patients)


def get_patient_by_collection_and_modality(call: Call) -> Reply:
    collection, modality = call.q("Collection"), call.q("Modality")
    if collection is None or modality is None:
        return wire.bad_request(
            "A parameter, Collection and Modality, are required for this API call.")
    allowed = _collections_for(call)
    series = select_series(call.archive, allowed,
                           SeriesFilter(collection=collection, modality=modality))
    wanted = {(s.collection, s.patient_id) for s in series}
    ids = [p.patient_id for p in visible_patients(call, allowed, collection)
           if (p.collection, p.patient_id) in wanted]
    if call.v4:
        return wire.format_rows(call.q("format"), ("PatientId", "Authorized"),
                                [(i, 1) for i in ids])
    return wire.format_rows(call.q("format"), ("PatientId",), [(i,) for i in ids])


def _date_param(call: Call) -> tuple[str | None, Callable[[str], dt.date | None]]:
    if call.v4:
        return call.q("fromDate"), parse_mm_dd_yyyy
    return call.q("Date"), parse_yyyy_mm_dd


def _released_since(call: Call, collection: str, since: dt.date) -> bool:
    facts = call.ctx.facts(collection)
    if facts is None:
        return False
    # v1/v2 compare dateReleased > date; v4 date_released >= fromDate.
    return facts.date_released >= since if call.v4 else facts.date_released > since


def _new_in(call: Call) -> str | Reply:
    """The collection a New* query asks about, or its whole reply when nothing is new."""
    collection, (raw_date, parse) = call.q("Collection"), _date_param(call)
    if collection is None or raw_date is None:
        return wire.bad_request(NEED_DATE)
    since = parse(raw_date)
    if since is None or not _released_since(call, collection, since):
        return wire.empty_ok()
    return collection


def new_patients_in_collection(call: Call) -> Reply:
    collection = _new_in(call)
    if isinstance(collection, Reply):
        return collection
    return _patient_rows(call, visible_patients(call, _collections_for(call), collection))


def _study_rows(call: Call, flt: SeriesFilter, study_uid: str | None) -> Reply:
    allowed = _collections_for(call)
    counts = Counter(s.study_instance_uid for s in select_series(call.archive, allowed, flt))
    views = call.views()
    rows = []
    for st in call.archive.studies(flt.collection or None, flt.patient_id or None):
        if (st.collection not in allowed or not counts[st.study_instance_uid]
                or not ci_eq(st.collection, flt.collection)
                or not ci_eq(st.patient_id, flt.patient_id)
                or not _uid_match(st.study_instance_uid, study_uid, call.v4)):
            continue
        patient = views.patient(st.collection, st.patient_id)
        rows.append(wire.study_row(st, patient, counts[st.study_instance_uid], call.v4))
    columns = wire.STUDY_V4 if call.v4 else wire.STUDY_V1
    return wire.format_rows(call.q("format"), columns, rows)


def _uid_match(value: str, wanted: str | None, ci: bool) -> bool:
    if wanted is None:
        return True
    return value.upper() == wanted.upper() if ci else value == wanted


def get_patient_study(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), patient_id=call.q("PatientID"))
    return _study_rows(call, flt, call.q("StudyInstanceUID"))


def new_studies_in_patient_collection(call: Call) -> Reply:
    collection = _new_in(call)
    if isinstance(collection, Reply):
        return collection
    flt = SeriesFilter(collection=collection, patient_id=call.q("PatientID"))
    return _study_rows(call, flt, None)


def _series_filter(call: Call) -> SeriesFilter:
    q = call.q
    return SeriesFilter(collection=q("Collection"), patient_id=q("PatientID"),
                        study_uid=q("StudyInstanceUID"), series_uid=q("SeriesInstanceUID"),
                        modality=q("Modality"), body_part=q("BodyPartExamined"),
                        manufacturer=q("Manufacturer"), model=q("ManufacturerModelName"),
                        uid_ci=call.v4)


def get_series(call: Call) -> Reply:
    series = select_series(call.archive, _collections_for(call), _series_filter(call))
    return _series_reply(call, series, wire.series_row_v1, wire.SERIES_V1)


def get_updated_series(call: Call) -> Reply:
    raw = call.q("fromDate")
    if call.v4:
        since = parse_mm_dd_yyyy(raw if raw is not None else "01-01-1900")
    else:
        since = parse_dd_mm_yyyy(raw if raw is not None else "01/01/1900")
    if since is None:
        return wire.empty_ok()
    allowed = frozenset(c for c in call.ctx.public
                        if call.ctx.collections[c].date_released > since)
    series = select_series(call.archive, allowed, SeriesFilter())
    return _series_reply(call, series, wire.updated_series_row_v1, wire.UPDATED_SERIES_V1)


def _series_reply(call: Call, series, v1_row, v1_columns) -> Reply:  # noqa: ANN001
    """Series rows in the version's shape: v4 has one, v1/v2 differ by endpoint."""
    views = call.views()
    row, columns = (wire.series_row_v4, wire.SERIES_V4) if call.v4 else (v1_row, v1_columns)
    return wire.format_rows(call.q("format"), columns, [row(views.of(s)) for s in series])


def get_series_size(call: Call) -> Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES)
    allowed = call.visible if call.api == "v2" else call.ctx.public
    series = visible_series(call.archive, allowed, uid, uid_ci=call.v4)
    columns = ("TotalSizeInBytes", "ObjectCount")
    if series is None:
        # v1/v2 run an aggregate without GROUP BY: one row of NULLs, i.e. [{}].
        rows = [] if call.v4 else [(None, None)]
        return wire.format_rows(call.q("format"), columns, rows)
    return wire.format_rows(call.q("format"), columns,
                            [(series.file_size, series.image_count)])


def get_sop_instance_uids(call: Call) -> Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES)
    # v4 getImages_v4 filters on the UID only: no authorisation at all.
    allowed = frozenset(call.ctx.collections) if call.v4 else _collections_for(call)
    if visible_series(call.archive, allowed, uid) is None:
        return wire.empty_ok()
    instances = wire.default_order(call.archive.instances(uid))
    return wire.format_values(call.q("format"), "SOPInstanceUID",
                              [i.sop_instance_uid for i in instances])


def get_series_metadata_v1(call: Call) -> Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES)
    series = visible_series(call.archive, _collections_for(call), uid)
    if series is None:
        return Reply(204)
    instances = call.archive.instances(uid)
    sop_class = instances[0].sop_class_uid if instances else None
    row = wire.series_metadata_row_v1(call.views().of(series), sop_class)
    return wire.format_rows(call.q("format"), wire.SERIES_METADATA_V1, [row])


def get_series_metadata_v4(call: Call) -> Reply:
    uids = [u for value in call.req.form.get("list", [])
            for u in re.sub(r"[^0-9,.]", "", value).split(",") if u]
    if not uids:
        return wire.bad_request(
            "A form parameter, list, containing at least one SeriesInstanceUID is required.")
    views, rows = call.views(), []
    for uid in uids:
        series = visible_series(call.archive, call.visible, uid)
        if series is not None:
            rows.append(wire.series_metadata_row_v4(views.of(series)))
    fmt = call.req.f("format")
    if fmt is None or fmt.lower() == "csv":
        fmt = "csv-download"
    return wire.format_rows(fmt, wire.SERIES_METADATA_V4, rows)


def get_contents_by_name(call: Call) -> Reply:
    name = call.q("name")
    if name is None:
        return wire.bad_request("A parameter, name is required for this API call.")
    views = call.views()
    rows = [wire.updated_series_row_v1(views.of(s)) for s in _cart(call, name)]
    return wire.format_rows("json", wire.CART_SERIES, rows)


def _cart(call: Call, name: str) -> list[SeriesRecord]:
    uids = call.ctx.carts.get(name, [])
    found = (visible_series(call.archive, call.ctx.public, uid) for uid in uids)
    return [s for s in found if s is not None]


def _build_carts(ctx: Context) -> dict[str, list[str]]:
    public = sorted(ctx.public)
    firsts: list[str] = []
    for name in public:
        series = ctx.archive.series(collection=name)
        firsts += [series[0].series_instance_uid] if series else []
    first_patient: list[str] = []
    patients = ctx.archive.patients(public[0]) if public else []
    if patients:
        p = patients[0]
        first_patient = [s.series_instance_uid
                         for s in ctx.archive.series(collection=p.collection,
                                                     patient_id=p.patient_id)]
    return {"nbia-demo-cart": firsts, "nbia-first-patient-cart": first_patient}


# --- ValuesAndCounts, descriptions, DICOM tags ------------------------------------------

_COUNT_KEYS = {"getCollectionValuesAndCounts": ("Collection", "collection"),
               "getModalityValuesAndCounts": ("Modality", "modality"),
               "getBodyPartValuesAndCounts": ("BodyPart", "body_part_examined"),
               "getManufacturerValuesAndCounts": ("Manufacturer", "manufacturer"),
               "getSpeciesValuesAndCounts": ("Species", None)}


def _value_counts(call: Call, endpoint: str) -> list[tuple[str, int]]:
    q = call.q
    flt = SeriesFilter()
    if endpoint != "getSpeciesValuesAndCounts":
        flt = SeriesFilter(collection=q("Collection"), modality=q("Modality"),
                           body_part=q("BodyPartExamined"))
    series = select_series(call.archive, call.visible, flt)
    attr = _COUNT_KEYS[endpoint][1]
    views = call.views()
    patients: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for s in series:
        if attr is None:
            p = views.patient(s.collection, s.patient_id)
            value: str | None = (p.species_code if p else None) or wire.HUMAN_SPECIES_CODE
        else:
            value = getattr(s, attr)
        if value is not None:
            patients[value].add((s.collection, s.patient_id))
    return sorted(((v, len(ps)) for v, ps in patients.items()), key=lambda vc: vc[0].upper())


def values_and_counts(endpoint: str) -> Callable[[Call], Reply]:
    def handler(call: Call) -> Reply:
        counts = _value_counts(call, endpoint)
        if call.api == "root":  # Jackson over ValuesAndCountsDTO: the count is a string
            return wire.jackson([{"criteria": v, "count": str(n)} for v, n in counts])
        key = _COUNT_KEYS[endpoint][0]
        return wire.format_rows("json", (key, "Count", "Authorized"),
                                [(v, n, 1) for v, n in counts])
    return handler


def get_collection_descriptions(call: Call) -> Reply:
    wanted = call.q("collectionName")
    every = sorted(f.name for f in call.archive.collections.values())
    licenses = sorted({f.license_name for f in call.archive.collections.values()})
    out: list[dict[str, object]] = []
    for name in sorted(call.visible):
        facts = call.ctx.collections[name]
        if wanted and name.upper() != wanted.upper():
            continue
        released = dt.datetime.combine(facts.date_released, dt.time(), dt.UTC)
        row: dict[str, object] = {"description": facts.description,
                                  "id": every.index(name) + 1}
        if call.api == "root":
            row["collectionDescTimestamp"] = int(released.timestamp() * 1000)
        row["collectionName"] = name
        if call.api == "root":
            row["userName"] = "nbia_admin"
            row["licenseId"] = licenses.index(facts.license_name) + 1
        row["descriptionURI"] = facts.doi
        out.append(row)
    return wire.jackson(out)


def get_dicom_tags(call: Call) -> Reply:
    uid = call.q("SeriesUID")
    if uid is None:
        return wire.bad_request("A parameter, SeriesUID, is required for this API call.")
    series = visible_series(call.archive, call.visible, uid)
    dataset = call.archive.dicom_tags(uid) if series is not None else None
    if dataset is None:
        return wire.bad_request(DENIED.format(uid=uid))
    return wire.jackson(wire.dicom_tag_rows(dataset))


# --- downloads ---------------------------------------------------------------------------

#: The pcorrupt fault of the request this thread is answering.
_DAMAGE: contextvars.ContextVar[Damage | None] = contextvars.ContextVar("damage", default=None)


def _image_chunks(call: Call, uid: str, sop: str) -> Iterator[bytes]:
    chunks = call.archive.iter_instance_chunks(uid, sop)
    damage = _DAMAGE.get()
    if damage is not None and damage.strikes():
        call.ctx.stats.fault(call.ctx.host, "corrupt")
        return damaged(chunks)
    return chunks


def _instance_member(call: Call, series: SeriesRecord, name: str, inst: InstanceRecord
                     ) -> zipstream.ZipMember:
    uid, sop = series.series_instance_uid, inst.sop_instance_uid
    return zipstream.ZipMember(name, lambda: _image_chunks(call, uid, sop),
                               inst.size, zipstream.zip_time(series.max_submission_timestamp))


def _write_zip(call: Call, key: tuple[object, ...],
               members: Callable[[], Iterable[zipstream.ZipMember]], sink: wire.Sink) -> None:
    damage = _DAMAGE.get()
    if damage is not None and damage.possible:  # a damaged body is neither kept nor replayed
        zipstream.write_zip(members(), sink)
    else:
        call.ctx.bodies.write(key, members, sink)


def _zip_reply(call: Call, series: SeriesRecord,
               members: Callable[[], Iterable[zipstream.ZipMember]], *flavour: object
               ) -> Reply:
    """A series as a ZIP; `flavour` names what, beside the series, shapes the body."""
    disposition = f'attachment; filename="{series.series_instance_uid}.zip"'
    # A series re-submitted to the archive is another body: its submission time moved.
    key = (call.api, series.series_instance_uid, series.max_submission_timestamp, *flavour)
    return Reply(200, content_type="application/octet-stream",
                 headers=[("Content-Disposition", disposition)],
                 stream=lambda sink: _write_zip(call, key, members, sink),
                 size_hint=series.file_size // 2)


def _download_target(call: Call) -> SeriesRecord | Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES_COMMA)
    series = visible_series(call.archive, _collections_for(call), uid)
    if series is None:
        return wire.bad_request((V1_DENIED if call.api == "v1" else DENIED).format(uid=uid))
    return series


def _yes(value: str | None) -> bool:
    return value is not None and value.lower() == "yes"


def get_image(call: Call) -> Reply:
    series = _download_target(call)
    if isinstance(series, Reply):
        return series
    instances = call.archive.instances(series.series_instance_uid)
    named = (wire.new_file_names(instances) if _yes(call.q("NewFileNames"))
             else wire.sequential_names(instances))
    with_md5 = call.api == "v4" and _yes(call.q("IncludeMD5"))
    facts = call.ctx.facts(series.collection)
    when = series.max_submission_timestamp

    def members() -> Iterable[zipstream.ZipMember]:
        yield zipstream.bytes_member("LICENSE", wire.license_text(facts).encode(), when)
        for name, inst in named:
            yield _instance_member(call, series, name, inst)
        if with_md5:
            yield zipstream.bytes_member("md5hashes.csv", _md5_table(named), when)

    return _zip_reply(call, series, members, "getImage", _yes(call.q("NewFileNames")),
                      with_md5)


def _md5_table(named: Sequence[tuple[str, InstanceRecord]]) -> bytes:
    # Java HashMap order: deterministic here, but deliberately not the file order.
    rows = sorted(((n, i.md5) for n, i in named), key=lambda r: hash_order(r[0]))
    return wire.md5_csv(rows)


def hash_order(name: str) -> int:
    """Java ``String.hashCode`` spread as HashMap does: a stable, unordered-looking key."""
    h = 0
    for ch in name:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0xF


def get_image_with_md5_hash(call: Call) -> Reply:
    series = _download_target(call)
    if isinstance(series, Reply):
        return series
    named = wire.sequential_names(call.archive.instances(series.series_instance_uid))
    when = series.max_submission_timestamp

    def members() -> Iterable[zipstream.ZipMember]:
        for name, inst in named:
            yield _instance_member(call, series, name, inst)
        yield zipstream.bytes_member("md5hashes.csv", _md5_table(named), when)

    return _zip_reply(call, series, members, "getImageWithMD5Hash")


def get_single_image(call: Call) -> Reply:
    uid, sop = call.q("SeriesInstanceUID"), call.q("SOPInstanceUID")
    if uid is None or sop is None:
        return wire.bad_request("A parameter, SeriesInstanceUID and SOPInstanceUID, are "
                                "required for this API call.")
    series = visible_series(call.archive, _collections_for(call), uid)
    inst = _find_instance(call.archive, series, sop)
    if series is None or inst is None:
        return wire.server_error(NPE)
    return _dicom_reply(call, uid, inst, f"attachment; filename={sop}.dcm")


def _find_instance(archive: Archive, series: SeriesRecord | None, sop: str
                   ) -> InstanceRecord | None:
    if series is None:
        return None
    found = [i for i in archive.instances(series.series_instance_uid)
             if i.sop_instance_uid == sop]
    return found[0] if found else None


def _dicom_reply(call: Call, uid: str, inst: InstanceRecord, disposition: str) -> Reply:
    def stream(sink: wire.Sink) -> None:
        for chunk in _image_chunks(call, uid, inst.sop_instance_uid):
            sink(chunk)

    return Reply(200, content_type="application/dicom",
                 headers=[("Content-Disposition", disposition)], stream=stream,
                 length=inst.size, size_hint=inst.size)


# --- the NBIA endpoint table -------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    handler: Callable[[Call], Reply]
    apis: frozenset[str]
    allowed: frozenset[str] | None = None  # v4 query-parameter whitelist; None = no check
    auth: str = "swallow"  # "direct" | "swallow" | "tags": where an invalid token surfaces
    root_auth: str | None = None
    method: str = "GET"

    def auth_for(self, api: str) -> str:
        return self.root_auth if api == "root" and self.root_auth else self.auth


def _ep(handler: Callable[[Call], Reply], apis: str, allowed: str | None = None,
        **kw: object) -> Endpoint:
    whitelist = None if allowed is None else frozenset(allowed.split())
    return Endpoint(handler, frozenset(apis.split()), whitelist, **kw)  # type: ignore[arg-type]


V124 = "v1 v2 v4"
SERIES_PARAMS = ("Collection format PatientID StudyInstanceUID Modality BodyPartExamined "
                 "ManufacturerModelName Manufacturer SeriesInstanceUID")

#: name -> endpoint, for /nbia-api/services/{v1,v2,v4}/<name> and /nbia-api/services/<name>.
NBIA: dict[str, Endpoint] = {
    "getCollectionValues": _ep(get_collection_values, V124, "format", auth="direct"),
    "getModalityValues": _ep(get_modality_values, V124, "Collection format BodyPartExamined"),
    "getBodyPartValues": _ep(get_body_part_values, V124, "Collection format Modality"),
    "getManufacturerValues": _ep(get_manufacturer_values, V124,
                                 "Collection format Modality BodyPartExamined"),
    "getPatient": _ep(get_patient, V124, "Collection PatientId format"),
    "getPatientByCollectionAndModality": _ep(get_patient_by_collection_and_modality, V124,
                                             "Collection Modality format"),
    "NewPatientsInCollection": _ep(new_patients_in_collection, V124,
                                   "Collection fromDate format"),
    "NewStudiesInPatientCollection": _ep(new_studies_in_patient_collection, V124,
                                         "Collection PatientID fromDate format"),
    "getPatientStudy": _ep(get_patient_study, V124,
                           "Collection PatientID StudyInstanceUID format"),
    "getSeries": _ep(get_series, V124, SERIES_PARAMS),
    "getUpdatedSeries": _ep(get_updated_series, V124, "fromDate format"),
    "getSeriesSize": _ep(get_series_size, V124, "SeriesInstanceUID format"),
    "getSOPInstanceUIDs": _ep(get_sop_instance_uids, V124, "SeriesInstanceUID format"),
    "getSeriesMetaData": _ep(get_series_metadata_v1, "v1 v2", auth="direct"),
    "getSeriesMetadata": _ep(get_series_metadata_v4, "v4", auth="direct", method="POST"),
    "getContentsByName": _ep(get_contents_by_name, "v1 v2"),
    "getImage": _ep(get_image, V124, "SeriesInstanceUID NewFileNames IncludeMD5",
                    auth="direct"),
    "getImageWithMD5Hash": _ep(get_image_with_md5_hash, V124, "SeriesInstanceUID",
                               auth="direct"),
    "getSingleImage": _ep(get_single_image, V124, "SeriesInstanceUID SOPInstanceUID",
                          auth="direct"),
    "getDicomTags": _ep(get_dicom_tags, "v4 root", "SeriesUID", auth="tags"),
    "getCollectionDescriptions": _ep(get_collection_descriptions, "v4 root", "collectionName",
                                     root_auth="direct"),
    "getCollectionValuesAndCounts": _ep(values_and_counts("getCollectionValuesAndCounts"),
                                        "v4 root", auth="direct"),
    "getModalityValuesAndCounts": _ep(values_and_counts("getModalityValuesAndCounts"),
                                      "v4 root", "Collection BodyPartExamined", auth="direct"),
    "getBodyPartValuesAndCounts": _ep(values_and_counts("getBodyPartValuesAndCounts"),
                                      "v4 root", "Collection Modality", auth="direct"),
    "getManufacturerValuesAndCounts": _ep(values_and_counts("getManufacturerValuesAndCounts"),
                                          "v4 root", "Collection Modality BodyPartExamined",
                                          auth="direct"),
    "getSpeciesValuesAndCounts": _ep(values_and_counts("getSpeciesValuesAndCounts"),
                                     "v4 root", auth="direct"),
}


def authorise(ctx: Context, endpoint: Endpoint, api: str, who: Identity) -> str | Reply:
    """The user name to serve, or the reply NBIA gives for this token (§4.3)."""
    if api == "v1":
        return GUEST
    if who.kind in ("guest", "user"):
        return who.username or GUEST
    kind = endpoint.auth_for(api)
    if who.kind == "missing":
        if api == "v4":
            return GUEST
        # v2/root call token.equalsIgnoreCase(...) on a null header: an NPE.
        return wire.server_error(NPE) if kind in ("direct", "tags") else wire.empty_ok()
    if ctx.expired_mode == "401" or kind == "direct":
        return wire.unauthorized_empty()
    return wire.server_error() if kind == "tags" else wire.empty_ok()


def run_nbia(ctx: Context, req: Request, api: str, name: str) -> Reply:
    endpoint = NBIA[name]
    if req.method != endpoint.method:
        return wire.server_error("HTTP 405 Method Not Allowed")
    if api == "v4" and endpoint.allowed is not None:
        for param in req.query:
            if param not in endpoint.allowed:
                return wire.invalid_params("query", param, endpoint.allowed)
    who = ctx.auth.identify(req.headers.get("authorization"))
    user = authorise(ctx, endpoint, api, who)
    if isinstance(user, Reply):
        return user
    return endpoint.handler(Call(ctx, req, api, user))


# --- legacy Bindaas API ------------------------------------------------------------------

def _missing(call: Call, *names: str) -> Reply | None:
    absent = [n for n in names if not call.q(n)]
    if absent:
        return wire.text(400, "Missing required parameter(s): " + ", ".join(absent))
    return None


def _legacy_values(attr: str, column: str, flt_params: Sequence[str]
                   ) -> Callable[[Call], Reply]:
    keys = {"Collection": "collection", "Modality": "modality",
            "BodyPartExamined": "body_part"}

    def handler(call: Call) -> Reply:
        flt = SeriesFilter(**{keys[p]: call.q(p) for p in flt_params})  # type: ignore[arg-type]
        return wire.format_values(call.q("format"), column, _distinct_values(call, flt, attr))
    return handler


def legacy_collections(call: Call) -> Reply:
    return wire.format_values(call.q("format"), "Collection", sorted(call.ctx.public))


def _legacy_patients(call: Call, patients: Iterable[PatientRecord]) -> Reply:
    rows = [wire.legacy_patient_row(p) for p in patients]
    return wire.format_rows(call.q("format"), wire.LEGACY_PATIENT, rows)


def legacy_patient(call: Call) -> Reply:
    return _legacy_patients(call, visible_patients(call, call.ctx.public, call.q("Collection")))


def legacy_patients_by_modality(call: Call) -> Reply:
    missing = _missing(call, "Collection", "Modality")
    if missing:
        return missing
    flt = SeriesFilter(collection=call.q("Collection"), modality=call.q("Modality"))
    wanted = {(s.collection, s.patient_id)
              for s in select_series(call.archive, call.ctx.public, flt)}
    patients = visible_patients(call, call.ctx.public, call.q("Collection"))
    return _legacy_patients(call, [p for p in patients if (p.collection, p.patient_id) in wanted])


def _legacy_not_released_since(call: Call) -> Reply | None:
    """The reply when `Date` is missing, unreadable or after the collection's release."""
    missing = _missing(call, "Collection", "Date")
    if missing:
        return missing
    since = parse_iso(call.q("Date") or "")
    facts = call.ctx.facts(call.q("Collection") or "")
    if since is None or facts is None or not facts.date_released > since:
        return wire.empty_ok()
    return None


def legacy_new_patients(call: Call) -> Reply:
    refused = _legacy_not_released_since(call)
    return refused if refused is not None else legacy_patient(call)


def _legacy_studies(call: Call, flt: SeriesFilter, study_uid: str | None) -> Reply:
    counts = Counter(s.study_instance_uid
                     for s in select_series(call.archive, call.ctx.public, flt))
    views, rows = call.views(), []
    for st in call.archive.studies(flt.collection or None, flt.patient_id or None):
        if (counts[st.study_instance_uid] and ci_eq(st.collection, flt.collection)
                and _uid_match(st.study_instance_uid, study_uid, False)):
            patient = views.patient(st.collection, st.patient_id)
            rows.append(wire.legacy_study_row(st, patient, counts[st.study_instance_uid]))
    return wire.format_rows(call.q("format"), wire.LEGACY_STUDY, rows)


def legacy_patient_study(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), patient_id=call.q("PatientID"))
    return _legacy_studies(call, flt, call.q("StudyInstanceUID"))


def legacy_new_studies(call: Call) -> Reply:
    refused = _legacy_not_released_since(call)
    if refused is not None:
        return refused
    flt = SeriesFilter(collection=call.q("Collection"), patient_id=call.q("PatientID"))
    return _legacy_studies(call, flt, None)


def _legacy_series_rows(call: Call, series: Iterable[SeriesRecord]) -> Reply:
    views = call.views()
    rows = [wire.legacy_series_row(views.of(s)) for s in series]
    return wire.format_rows(call.q("format"), wire.LEGACY_SERIES, rows)


def legacy_series(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), patient_id=call.q("PatientID"),
                       study_uid=call.q("StudyInstanceUID"), modality=call.q("Modality"),
                       series_uid=call.q("SeriesInstanceUID"))
    return _legacy_series_rows(call, select_series(call.archive, call.ctx.public, flt))


def legacy_contents_by_name(call: Call) -> Reply:
    missing = _missing(call, "name")
    return missing or _legacy_series_rows(call, _cart(call, call.q("name") or ""))


def legacy_series_size(call: Call) -> Reply:
    missing = _missing(call, "SeriesInstanceUID")
    if missing:
        return missing
    series = visible_series(call.archive, call.ctx.public, call.q("SeriesInstanceUID") or "")
    rows = [] if series is None else [(f"{series.file_size}.0", series.image_count)]
    return wire.format_rows(call.q("format"), ("TotalSizeInBytes", "ObjectCount"), rows)


def legacy_sop_uids(call: Call) -> Reply:
    missing = _missing(call, "SeriesInstanceUID")
    if missing:
        return missing
    uid = call.q("SeriesInstanceUID") or ""
    if visible_series(call.archive, call.ctx.public, uid) is None:
        return wire.empty_ok()
    instances = wire.default_order(call.archive.instances(uid))
    return wire.format_values(call.q("format"), "SOPInstanceUID",
                              [i.sop_instance_uid for i in instances])


def legacy_image(call: Call) -> Reply:
    missing = _missing(call, "SeriesInstanceUID")
    if missing:
        return missing
    series = visible_series(call.archive, call.ctx.public, call.q("SeriesInstanceUID") or "")
    if series is None:
        return wire.text(404, "Not Found")
    instances = wire.default_order(call.archive.instances(series.series_instance_uid))

    def members() -> Iterable[zipstream.ZipMember]:
        for inst in instances:
            yield _instance_member(call, series, f"{inst.sop_instance_uid}.dcm", inst)

    return _zip_reply(call, series, members, "legacy")


def legacy_single_image(call: Call) -> Reply:
    missing = _missing(call, "SeriesInstanceUID", "SOPInstanceUID")
    if missing:
        return missing
    uid, sop = call.q("SeriesInstanceUID") or "", call.q("SOPInstanceUID") or ""
    inst = _find_instance(call.archive, visible_series(call.archive, call.ctx.public, uid), sop)
    if inst is None:
        return wire.text(404, "Not Found")
    return _dicom_reply(call, uid, inst, f'attachment; filename="{sop}.dcm"')


#: name -> handler, for /services/{v3,v4}/TCIA/query/<name>.
LEGACY: dict[str, Callable[[Call], Reply]] = {
    "getCollectionValues": legacy_collections,
    "getModalityValues": _legacy_values("modality", "Modality",
                                        ("Collection", "BodyPartExamined", "Modality")),
    "getBodyPartValues": _legacy_values("body_part_examined", "BodyPartExamined",
                                        ("Collection", "Modality")),
    "getManufacturerValues": _legacy_values("manufacturer", "Manufacturer",
                                            ("Collection", "Modality", "BodyPartExamined")),
    "getPatient": legacy_patient,
    "PatientsByModality": legacy_patients_by_modality,
    "getPatientStudy": legacy_patient_study,
    "getSeries": legacy_series,
    "getSeriesSize": legacy_series_size,
    "getSOPInstanceUIDs": legacy_sop_uids,
    "getSingleImage": legacy_single_image,
    "getImage": legacy_image,
    "NewPatientsInCollection": legacy_new_patients,
    "NewStudiesInPatientCollection": legacy_new_studies,
    "ContentsByName": legacy_contents_by_name,
}


def run_legacy(ctx: Context, req: Request, version: str, name: str) -> Reply:
    if version == "v3":
        key = req.headers.get("api_key") or req.q("api_key")
        if not ctx.auth.api_key_ok(key):
            return wire.text(401, "Invalid or missing api_key")
    if req.method != "GET":
        return wire.text(405, "Method Not Allowed")
    return LEGACY[name](Call(ctx, req, f"legacy-{version}"))


# --- routing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    name: str  # "getImage"
    qualified: str  # "v4/getImage"
    run: Callable[[], Reply]


def route(ctx: Context, req: Request) -> Route:
    path = req.path
    if path in TOKEN_PATHS:
        return Route("token", "oauth/token", lambda: _token(ctx, req))
    if path == LOGOUT_PATH:
        return Route("logout", "oauth/logout",
                     lambda: ctx.auth.logout(req.headers.get("authorization"), req.merged()))
    legacy = LEGACY_RE.match(path)
    if legacy and legacy[2] in LEGACY:
        version, name = legacy[1], legacy[2]
        return Route(name, f"legacy-{version}/{name}",
                     lambda: run_legacy(ctx, req, version, name))
    if path.startswith(SERVICES):
        api, _, name = path[len(SERVICES):].rpartition("/")
        api = api or "root"
        endpoint = NBIA.get(name)
        if endpoint is not None and api in endpoint.apis:
            return Route(name, f"{api}/{name}", lambda: run_nbia(ctx, req, api, name))
    if path.startswith(("/nbia-api/", "/services/")):
        return Route("unknown", "unknown/unknown", lambda: wire.server_error(NOT_FOUND))
    return Route("unknown", "unknown/unknown", lambda: wire.text(404, "Not Found"))


def _token(ctx: Context, req: Request) -> Reply:
    if req.method != "POST":
        return wire.server_error("HTTP 405 Method Not Allowed")
    return ctx.auth.token_endpoint(req.merged())


def control(ctx: Context, req: Request) -> Reply:
    """The /_emulator/ paths."""
    name = req.path[len("/_emulator/"):]
    if name == "stats" and req.method == "GET":
        return wire.jackson(ctx.stats.snapshot())
    if name == "reset" and req.method == "POST":
        ctx.stats.reset()
        return wire.jackson(ctx.stats.snapshot())
    if name == "faults" and req.method == "GET":
        return wire.jackson(ctx.faults.config.to_json())
    if name == "faults" and req.method == "POST":
        try:
            patch = json.loads(req.body.decode("utf-8", "replace") or "{}")
            return wire.jackson(ctx.faults.update(patch).to_json())
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            reply = wire.jackson({"error": str(exc)})
            reply.status = 400
            return reply
    return wire.text(404, "Not Found")


# --- HTTP plumbing -----------------------------------------------------------------------

def fault_reply(plan: FaultPlan) -> Reply:
    status = plan.status or 500
    if status == 429:
        return Reply(429, b"Too Many Requests", "text/plain",
                     [("Retry-After", str(plan.retry_after))])
    if status == 500:
        return wire.server_error("Injected fault")
    titles = {502: "502 Bad Gateway", 503: "503 Service Temporarily Unavailable",
              504: "504 Gateway Time-out"}
    page = (f"<html><head><title>{titles[status]}</title></head><body><center><h1>"
            f"{titles[status]}</h1></center></body></html>\n")
    return Reply(status, page.encode(), "text/html")


class _BodyWriter:
    """Writes one body: throttled, counted, chunk-framed, and cut when a fault says so.

    One chunk is always held back, so an injected cut can land before the last byte
    even when the body turns out shorter than the planned cut point.
    """

    def __init__(self, handler: Handler, plan: FaultPlan, chunked: bool, size_hint: int):
        self._handler = handler
        self._plan = plan
        self._chunked = chunked
        self._cut_at = int(size_hint * plan.cut_fraction) if plan.cut and size_hint else None
        self._pending: bytes | None = None
        self._sent = 0  # payload bytes
        self._raw_sent = 0  # bytes on the wire, for the bandwidth cap
        self._started = 0.0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is not None:
            self._emit(self._pending)
        self._pending = bytes(data)

    def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self._plan.cut:
            self._payload(pending[: len(pending) // 2])
            self._cut()
        if pending is not None and self._plan.last_byte_delay > 0:
            self._payload(pending[:-1])
            pending = pending[-1:]
            ctx = self._handler.server.ctx
            ctx.stats.fault(ctx.host, "slow_last_byte")
            time.sleep(self._plan.last_byte_delay)
        if pending is not None:
            self._payload(pending)
        if self._plan.cut:
            self._cut()
        if self._chunked:
            self._raw(b"0\r\n\r\n")

    def _emit(self, data: bytes) -> None:
        if self._cut_at is not None and self._sent + len(data) > self._cut_at:
            self._payload(data[: max(0, self._cut_at - self._sent)])
            self._cut()
        self._payload(data)

    def _payload(self, data: bytes) -> None:
        if not data:
            return
        framed = b"%X\r\n%b\r\n" % (len(data), data) if self._chunked else data
        self._raw(framed)
        self._sent += len(data)
        self._handler.count_bytes(len(data))

    def _raw(self, data: bytes) -> None:
        bandwidth = self._plan.bandwidth
        try:
            if bandwidth <= 0:
                self._handler.wfile.write(data)
                return
            if not self._started:
                self._started = time.monotonic()
            step = max(1024, min(65536, bandwidth // 20))
            for start in range(0, len(data), step):
                piece = data[start:start + step]
                self._handler.wfile.write(piece)
                self._raw_sent += len(piece)
                delay = self._started + self._raw_sent / bandwidth - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except OSError as exc:  # the client went away
            self._handler.close_connection = True
            raise zipstream.StreamAborted("client disconnected") from exc

    def _cut(self) -> None:
        self._handler.cut_connection(self._plan.cut or "truncate")
        raise zipstream.StreamAborted(self._plan.cut)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tciafs-emulator"
    server: EmulatorHTTPServer
    timeout = 120  # seconds a connection may sit idle (or stalled) before it is dropped
    _counted = True

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the second waits
        # for the client's delayed ACK (~40 ms per response).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        ctx = self.server.ctx
        req = self._read_request()
        if req is None:
            return
        if req.path.startswith("/_emulator/"):
            self._send(control(ctx, req), FaultPlan(), counted=False)
            return
        target = route(ctx, req)
        ctx.stats.request(ctx.host, target.name, target.qualified)
        plan = ctx.faults.plan([target.name, target.qualified])
        if plan.latency > 0:
            time.sleep(plan.latency)
        damage = _DAMAGE.set(Damage(plan))  # bodies are made while they are sent
        try:
            if plan.status is not None:
                ctx.stats.fault(ctx.host, str(plan.status))
                reply = fault_reply(plan)
            else:
                reply = self._run(target)
            self._send(reply, plan)
        finally:
            _DAMAGE.reset(damage)

    def _run(self, target: Route) -> Reply:
        try:
            return target.run()
        except Exception as exc:  # NBIA's catch-all mapper: 500 with the message
            traceback.print_exc(file=sys.stderr)
            return wire.server_error(f"{type(exc).__name__}: {exc}")

    def _read_request(self) -> Request | None:
        url = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._read_body(headers)
        if body is None:
            return None
        form: dict[str, list[str]] = {}
        if "application/x-www-form-urlencoded" in headers.get("content-type", ""):
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"),
                                         keep_blank_values=True)
        return Request(self.command, urllib.parse.unquote(url.path),
                       urllib.parse.parse_qs(url.query, keep_blank_values=True), form, headers,
                       body)

    def _read_body(self, headers: dict[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(400, "Bad Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                self.send_error(400, "Bad chunk")
                return None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _send(self, reply: Reply, plan: FaultPlan, counted: bool = True) -> None:
        ctx = self.server.ctx
        self._counted = counted
        if plan.first_byte_delay > 0:
            ctx.stats.fault(ctx.host, "slow_first_byte")
            time.sleep(plan.first_byte_delay)
        if plan.cut and reply.stream is None and not reply.body:
            self.cut_connection(plan.cut)  # nothing to cut into: drop before the status
            return
        unsized = reply.stream is not None and reply.length is None
        # HTTP/1.0 has no chunked coding: such a body ends when the connection closes.
        chunked = unsized and self.request_version != "HTTP/1.0"
        if unsized and not chunked:
            self.close_connection = True
        self._send_head(reply, chunked)
        writer = _BodyWriter(self, plan, chunked, reply.size_hint or len(reply.body))
        try:
            if reply.stream is None:
                writer.feed(reply.body)
            else:
                reply.stream(writer.feed)
            writer.finish()
        except zipstream.StreamAborted:
            self.close_connection = True
        except Exception:  # headers are out: all we can do is end the connection
            traceback.print_exc(file=sys.stderr)
            self.cut_connection("truncate", count=False)

    def _send_head(self, reply: Reply, chunked: bool) -> None:
        if self._counted:
            self.server.ctx.stats.status(self.server.ctx.host, reply.status)
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif reply.stream is not None and reply.length is None:
            self.send_header("Connection", "close")
        elif reply.status not in (204, 304):
            length = reply.length if reply.stream is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def count_bytes(self, nbytes: int) -> None:
        if self._counted:
            self.server.ctx.stats.sent(self.server.ctx.host, nbytes)

    def cut_connection(self, kind: str, count: bool = True) -> None:
        """End the connection abruptly: RST for "reset", FIN for "truncate"."""
        ctx = self.server.ctx
        if count:
            ctx.stats.fault(ctx.host, kind)
        self.close_connection = True
        sock = self.connection
        try:
            if kind == "reset":
                _wait_until_sent(sock)  # let the partial body reach the client first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.server.ctx.verbose:
            # Redact api_key values: they are credentials.
            message = re.sub(r"(api_key=)[^&\s\"]*", r"\1***", format % args)
            sys.stderr.write(f"[{self.server.ctx.host}] {self.address_string()} {message}\n")


def _wait_until_sent(sock: socket.socket, limit: float = 0.5) -> None:
    request = getattr(termios, "TIOCOUTQ", None)  # Linux: bytes not yet sent
    if request is None:
        return
    deadline = time.monotonic() + limit
    buf = bytearray(struct.calcsize("i"))
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(sock.fileno(), request, buf)
        except OSError:
            return
        if struct.unpack("i", buf)[0] == 0:
            return
        time.sleep(0.005)


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx: Context) -> None:
        self.ctx = ctx
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the host, which may block on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{self.server_port}" if ":" in host else \
            f"http://{host}:{self.server_port}"


# --- starting and stopping ---------------------------------------------------------------

@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    nlst_port: int | None = None
    token_lifetime: float = 7200.0
    refresh_lifetime: float | None = None
    users: UserDB = field(default_factory=UserDB)
    faults: FaultConfig = field(default_factory=FaultConfig)
    expired_token_mode: str = "swallow"
    verbose: bool = False


class EmulatorServers:
    """The main server and the optional NLST server, serving from daemon threads."""

    def __init__(self, archive: Archive, options: Options) -> None:
        tokens = TokenStore(options.token_lifetime, options.refresh_lifetime)
        auth, faults, stats = Auth(options.users, tokens), Faults(options.faults), Stats()
        self.servers: list[EmulatorHTTPServer] = []
        ports = [("main", options.port)]
        if options.nlst_port is not None:
            ports.append(("nlst", options.nlst_port))
        try:
            for host, port in ports:
                ctx = Context(archive, host, auth, faults, stats, options.expired_token_mode,
                              options.verbose)
                self.servers.append(EmulatorHTTPServer((options.host, port), ctx))
                stats.register(host)
        except BaseException:
            self.close()
            raise
        self.stats, self.faults, self.auth = stats, faults, auth
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def nlst_url(self) -> str | None:
        return self.servers[1].url if len(self.servers) > 1 else None

    def start(self) -> EmulatorServers:
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                      name=f"emulator-{server.ctx.host}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        running = bool(getattr(self, "_threads", None))
        for server in self.servers:
            if running:
                server.shutdown()  # blocks until serve_forever returns: only if it runs
            server.server_close()
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=5)

    def __enter__(self) -> EmulatorServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
