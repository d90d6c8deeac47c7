"""The NBIA endpoints: ``/nbia-api/services/{v1,v2,v4}/<name>`` and the unversioned
"Advanced" ``/nbia-api/services/<name>`` (getDicomTags, getCollectionDescriptions,
get*ValuesAndCounts), see :data:`NBIA`; with their authorisation.

Choices where the facts are silent (docs/nbia-wire.md, "Emulator choices"):

* Visibility (see :mod:`tciafs.emulator.queries`): as in NBIA, getUpdatedSeries, v1
  getSeriesSize, v4 getSeriesSize and getContentsByName use only the public
  collections; v4 getSOPInstanceUIDs does no authorisation at all.
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
* Shared carts (:data:`tciafs.emulator.context.CARTS`) are derived from the archive.
* getM5HashForImage without a UID answers as for an unknown one: the empty 200, with
  no Content-Type.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tciafs.emulator import wire
from tciafs.emulator.auth import GUEST, Identity
from tciafs.emulator.context import Call, Context, Request
from tciafs.emulator.downloads import SeriesZip, dicom_reply, zip_reply
from tciafs.emulator.model import PatientRecord, SeriesRecord
from tciafs.emulator.queries import (
    SeriesFilter,
    Views,
    cart_series,
    ci_eq,
    collections_for,
    distinct_values,
    find_instance,
    parse_dd_mm_yyyy,
    parse_mm_dd_yyyy,
    parse_yyyy_mm_dd,
    select_series,
    uid_match,
    visible_patients,
    visible_series,
)
from tciafs.emulator.wire import Reply

NPE = "java.lang.NullPointerException"
V1_DENIED = "Image with given SeriesInstanceUID,{uid}, is not in public domain."
DENIED = ("The user has not been granted the access to image with given SeriesInstanceUID,"
          "{uid}. Please contact System Admin to resolve this issue.")
NEED_SERIES = "A parameter, SeriesInstanceUID is required for this API call."
NEED_SERIES_COMMA = "A parameter, SeriesInstanceUID, is required for this API call."
NEED_DATE = "A parameter, Collection and Date are required for this API call."


# --- metadata endpoints ------------------------------------------------------------------

def get_collection_values(call: Call) -> Reply:
    names = sorted(collections_for(call), key=str.upper if call.v4 else None)
    return wire.format_values(call.q("format"), "Collection", names)


def get_modality_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), body_part=call.q("BodyPartExamined"))
    values = distinct_values(call, flt, "modality")
    return wire.format_values(call.q("format"), "Modality", values)


def get_body_part_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), modality=call.q("Modality"))
    values = distinct_values(call, flt, "body_part_examined")
    return wire.format_values(call.q("format"), "BodyPartExamined", values)


def get_manufacturer_values(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), modality=call.q("Modality"),
                       body_part=call.q("BodyPartExamined"))
    values = distinct_values(call, flt, "manufacturer")
    return wire.format_values(call.q("format"), "Manufacturer", values)


def _patient_rows(call: Call, patients: Iterable[PatientRecord]) -> Reply:
    columns = wire.PATIENT_V4 if call.v4 else wire.PATIENT_V1
    rows = [wire.patient_row(p, call.v4) for p in patients]
    return wire.format_rows(call.q("format"), columns, rows)


def get_patient(call: Call) -> Reply:
    patients = visible_patients(call, collections_for(call), call.q("Collection"),
                                call.q("PatientId"))
    return _patient_rows(call, patients)


def get_patient_by_collection_and_modality(call: Call) -> Reply:
    collection, modality = call.q("Collection"), call.q("Modality")
    if collection is None or modality is None:
        return wire.bad_request(
            "A parameter, Collection and Modality, are required for this API call.")
    allowed = collections_for(call)
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
    return _patient_rows(call, visible_patients(call, collections_for(call), collection))


def _study_rows(call: Call, flt: SeriesFilter, study_uid: str | None) -> Reply:
    allowed = collections_for(call)
    counts = Counter(s.study_instance_uid for s in select_series(call.archive, allowed, flt))
    views = Views(call.ctx)
    rows = []
    for st in call.archive.studies(flt.collection or None, flt.patient_id or None):
        if (st.collection not in allowed or not counts[st.study_instance_uid]
                or not ci_eq(st.collection, flt.collection)
                or not ci_eq(st.patient_id, flt.patient_id)
                or not uid_match(st.study_instance_uid, study_uid, call.v4)):
            continue
        patient = views.patient(st.collection, st.patient_id)
        rows.append(wire.study_row(st, patient, counts[st.study_instance_uid], call.v4))
    columns = wire.STUDY_V4 if call.v4 else wire.STUDY_V1
    return wire.format_rows(call.q("format"), columns, rows)


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
    series = select_series(call.archive, collections_for(call), _series_filter(call))
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
    views = Views(call.ctx)
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
    allowed = frozenset(call.ctx.collections) if call.v4 else collections_for(call)
    if visible_series(call.archive, allowed, uid) is None:
        return wire.empty_ok()
    instances = wire.default_order(call.archive.instances(uid))
    return wire.format_values(call.q("format"), "SOPInstanceUID",
                              [i.sop_instance_uid for i in instances])


def get_series_metadata_v1(call: Call) -> Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES)
    series = visible_series(call.archive, collections_for(call), uid)
    if series is None:
        return Reply(204)
    instances = call.archive.instances(uid)
    sop_class = instances[0].sop_class_uid if instances else None
    row = wire.series_metadata_row_v1(Views(call.ctx).of(series), sop_class)
    return wire.format_rows(call.q("format"), wire.SERIES_METADATA_V1, [row])


def get_series_metadata_v4(call: Call) -> Reply:
    uids = [u for value in call.req.form.get("list", [])
            for u in re.sub(r"[^0-9,.]", "", value).split(",") if u]
    if not uids:
        return wire.bad_request(
            "A form parameter, list, containing at least one SeriesInstanceUID is required.")
    views, rows = Views(call.ctx), []
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
    views = Views(call.ctx)
    rows = [wire.updated_series_row_v1(views.of(s)) for s in cart_series(call, name)]
    return wire.format_rows("json", wire.CART_SERIES, rows)

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
    views = Views(call.ctx)
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




def _download_target(call: Call) -> SeriesRecord | Reply:
    uid = call.q("SeriesInstanceUID")
    if uid is None:
        return wire.bad_request(NEED_SERIES_COMMA)
    series = visible_series(call.archive, collections_for(call), uid)
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
    terms = wire.license_text(call.ctx.facts(series.collection))
    return zip_reply(call, SeriesZip(series, named, terms, md5=with_md5), "getImage",
                     _yes(call.q("NewFileNames")), with_md5)


def get_image_with_md5_hash(call: Call) -> Reply:
    series = _download_target(call)
    if isinstance(series, Reply):
        return series
    named = wire.sequential_names(call.archive.instances(series.series_instance_uid))
    return zip_reply(call, SeriesZip(series, named, md5=True), "getImageWithMD5Hash")


def get_single_image(call: Call) -> Reply:
    uid, sop = call.q("SeriesInstanceUID"), call.q("SOPInstanceUID")
    if uid is None or sop is None:
        return wire.bad_request("A parameter, SeriesInstanceUID and SOPInstanceUID, are "
                                "required for this API call.")
    series = visible_series(call.archive, collections_for(call), uid)
    inst = find_instance(call.archive, series, sop)
    if series is None or inst is None:
        return wire.server_error(NPE)
    return dicom_reply(call, uid, inst, f"attachment; filename={sop}.dcm")


def _image_md5(call: Call, sop: str | None) -> Reply:
    """The MD5 NBIA keeps for one image, as text/plain. Both endpoints look it up as
    the guest: an image of a restricted collection, an unknown one, or none asked for,
    gets the empty 200 (docs/nbia-wire.md, "Single images")."""
    uid = call.archive.series_of_instance(sop) if sop else None
    series = visible_series(call.archive, call.ctx.public, uid) if uid else None
    inst = find_instance(call.archive, series, sop) if sop else None
    return wire.empty_ok() if inst is None else wire.text(200, inst.md5)


def get_m5_hash_for_image(call: Call) -> Reply:
    """v1 getM5HashForImage: "M5" and "SOPInstanceUid" spelt as NBIA spells them. The
    damaged-storage fault (pcorrupt) touches image bytes only: this keeps the stored hash."""
    return _image_md5(call, call.q("SOPInstanceUid"))


def get_md5_hash_for_image_v4(call: Call) -> Reply:
    """v4 getMD5HashForImage, broken as NBIA's is: it reads SOPInstanceUid, while its
    parameter check (the table below) lets only SOPInstanceUID through, so it never
    gets a UID and answers the empty 200."""
    return _image_md5(call, call.q("SOPInstanceUid"))


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
    "getM5HashForImage": _ep(get_m5_hash_for_image, "v1"),
    "getMD5HashForImage": _ep(get_md5_hash_for_image_v4, "v4", "SOPInstanceUID"),
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
    """The user name to serve, or the reply NBIA gives for this token."""
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
