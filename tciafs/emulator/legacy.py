"""The legacy Bindaas API: ``/services/v4/TCIA/query/<name>`` (no key) and
``/services/v3/TCIA/query/<name>`` (``api_key`` header or parameter), see :data:`LEGACY`.

As NBIA served it: JSON by default (``format`` json|csv|xml|html), empty results as 200
with an empty body, the old key spellings (``PatientID``, ``TimeStamp``…), dates
``YYYY-MM-DD``, ``Date=YYYY-MM-DD`` for the New* endpoints (strictly after),
getSeriesSize's ``TotalSizeInBytes`` a string such as ``"1234.0"``, getImage a ZIP of
``<SOPInstanceUID>.dcm`` files without LICENSE.  Missing required parameters: 400
``Missing required parameter(s): …``; unknown series or image: 404 ``Not Found``; a
missing or wrong v3 key: 401 ``Invalid or missing api_key``.  Only public collections
are served.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from tciafs.emulator import wire
from tciafs.emulator.context import Call, Context, Request
from tciafs.emulator.downloads import SeriesZip, dicom_reply, zip_reply
from tciafs.emulator.model import PatientRecord, SeriesRecord
from tciafs.emulator.queries import (
    SeriesFilter,
    Views,
    cart_series,
    ci_eq,
    distinct_values,
    find_instance,
    parse_iso,
    select_series,
    uid_match,
    visible_patients,
    visible_series,
)
from tciafs.emulator.wire import Reply


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
        return wire.format_values(call.q("format"), column, distinct_values(call, flt, attr))
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
    views, rows = Views(call.ctx), []
    for st in call.archive.studies(flt.collection or None, flt.patient_id or None):
        if (counts[st.study_instance_uid] and ci_eq(st.collection, flt.collection)
                and uid_match(st.study_instance_uid, study_uid, False)):
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
    views = Views(call.ctx)
    rows = [wire.legacy_series_row(views.of(s)) for s in series]
    return wire.format_rows(call.q("format"), wire.LEGACY_SERIES, rows)


def legacy_series(call: Call) -> Reply:
    flt = SeriesFilter(collection=call.q("Collection"), patient_id=call.q("PatientID"),
                       study_uid=call.q("StudyInstanceUID"), modality=call.q("Modality"),
                       series_uid=call.q("SeriesInstanceUID"))
    return _legacy_series_rows(call, select_series(call.archive, call.ctx.public, flt))


def legacy_contents_by_name(call: Call) -> Reply:
    missing = _missing(call, "name")
    return missing or _legacy_series_rows(call, cart_series(call, call.q("name") or ""))


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
    named = [(f"{inst.sop_instance_uid}.dcm", inst) for inst in instances]
    return zip_reply(call, SeriesZip(series, named), "legacy")


def legacy_single_image(call: Call) -> Reply:
    missing = _missing(call, "SeriesInstanceUID", "SOPInstanceUID")
    if missing:
        return missing
    uid, sop = call.q("SeriesInstanceUID") or "", call.q("SOPInstanceUID") or ""
    inst = find_instance(call.archive, visible_series(call.archive, call.ctx.public, uid), sop)
    if inst is None:
        return wire.text(404, "Not Found")
    return dicom_reply(call, uid, inst, f'attachment; filename="{sop}.dcm"')


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
