"""What NBIA puts on the wire: replies, the Jettison/Jackson writers and every row shape.

Everything here follows docs/nbia-wire.md, "Listing bodies", "Other formats", "Dates"
and "Columns by endpoint":

* Jettison list endpoints (``formatResponse``): a JSON array of objects, one key per
  column in column order, NULL columns dropped (a row of only NULLs is ``{}``),
  numbers stay numbers, strings stay strings, and an empty result is HTTP 200 with
  an *empty* body and no Content-Type.  ``format`` is json (default), html, xml,
  csv, csv-download and, for multi-column results only, csvquoted; any other value
  is a 500 -- but only when the result is non-empty.
* Multi-column ``csv`` is the quoted writer (``toCsvQuoted``), single-column ``csv``
  the plain one (``toCsv``), including their quirks (a NULL single value is an
  extra blank line; a NULL in any column of the quoted writer is ``","``).
* Jackson endpoints (getDicomTags, getCollectionDescriptions, root ValuesAndCounts)
  keep ``null`` values and answer ``[]`` when empty.
* Dates: ``java.sql.Timestamp.toString()`` (``2011-11-08 08:08:01.0``) in v1/v2,
  ``MM-DD-YYYY`` in v4.

Choices where those facts are silent (docs/nbia-wire.md, "Emulator choices"): XML/HTML
escape with the standard XML/HTML entities (NBIA uses ESAPI, which escapes more
characters); JSON is written as UTF-8 without ``\\/`` escaping; XML type names are
derived from the Python type.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydicom import datadict
from pydicom.multival import MultiValue

from tciafs.emulator.model import (
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

Value = str | int | float | bool | None
Row = Sequence[Value]
Sink = Callable[[bytes], None]

SERVER_ERROR = "Server was not able to process your request"
HUMAN_SPECIES_CODE = "337915000"
HUMAN_SPECIES = "Homo sapiens"
CSV_DOWNLOAD_NAME = 'attachment; filename="SeriesMetaData.csv"'


@dataclass
class Reply:
    """One HTTP answer.  ``stream`` makes it a streamed body (chunked unless ``length``)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Callable[[Sink], None] | None = None
    length: int | None = None
    size_hint: int = 0  # expected streamed size, so injected faults can cut mid-body


class Timestamp(str):
    """A ``java.sql.Timestamp`` already rendered; only its XML type name differs."""

    java_type = "java.sql.Timestamp"


# --- generic replies -------------------------------------------------------------------

def empty_ok() -> Reply:
    """``Response.ok().build()``: 200, Content-Length 0, no Content-Type."""
    return Reply(200)


def text(status: int, message: str, content_type: str | None = "text/plain") -> Reply:
    return Reply(status, message.encode(), content_type)


def bad_request(message: str) -> Reply:
    # NBIA declares these plain-text messages as application/json.
    return text(400, message, "application/json")


def server_error(detail: str | None = None) -> Reply:
    body = SERVER_ERROR if detail is None else f"{SERVER_ERROR}\n{detail}"
    return text(500, body)


def unauthorized_empty() -> Reply:
    return Reply(401)


def invalid_params(kind: str, name: str, allowed: Iterable[str]) -> Reply:
    # Java prints Set.of(...) as "[a, b]"; its order is unspecified, so any order is true.
    listing = "[" + ", ".join(allowed) + "]"
    return text(400, f"Invalid {kind} parameter: '{name}'. Allowed parameters are: {listing}",
                "application/xml")


# --- Jettison writers (formatResponse) ---------------------------------------------------

def jettison_json(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    objects = [{c: v for c, v in zip(columns, row, strict=True) if v is not None}
               for row in rows]
    return json.dumps(objects, ensure_ascii=False, separators=(",", ":")).encode()


def csv_plain(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    """``FormatOutput.toCsv``: unquoted, a NULL leaves its field empty."""
    lines = [",".join(columns)]
    lines += [",".join(_csv_text(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def csv_single(column: str, values: Iterable[Value]) -> bytes:
    """Single-column ``toCsv``: one value per line, a NULL gives an extra blank line."""
    parts = [column + "\n"]
    parts += [("\n" if v is None else _csv_text(v)) + "\n" for v in values]
    return "".join(parts).encode()


def csv_quoted(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    """``FormatOutput.toCsvQuoted``, reproducing its writer byte for byte."""
    out = ['"' + '","'.join(c.replace('"', '""') for c in columns) + '"\n']
    for row in rows:
        cells: list[str] = []
        for i, value in enumerate(row):
            if value is None:
                cells.append('","')  # the Java writer appends this for NULL at any position
            elif i > 0:
                cells.append('","' + _csv_text(value).replace('"', '""'))
            else:
                cells.append('"' + _csv_text(value).replace('"', '""'))
        out.append("".join(cells) + '"\n')
    return "".join(out).encode()


def xml_rows(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    parts = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Results>']
    for row in rows:
        parts.append("<Row>")
        for column, value in zip(columns, row, strict=True):
            if value is not None:
                parts.append(f"<{column} type='{_java_type(value)}'>"
                             f"{html.escape(_csv_text(value), quote=False)}</{column}>")
        parts.append("</Row>")
    parts.append("</Results>")
    return "".join(parts).encode()


def html_rows(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    parts = ["<P ALIGN='center'><TABLE BORDER=1><TR>"]
    parts += [f"<TH>{c}</TH>" for c in columns]
    parts.append("</TR>")
    for row in rows:
        parts.append("<TR>")
        parts += ["<TD>&nbsp;</TD>" if v is None else f"<TD>{html.escape(_csv_text(v))}</TD>"
                  for v in row]
        parts.append("</TR>")
    parts.append("</TABLE></P>")
    return "".join(parts).encode()


def format_rows(fmt: str | None, columns: Sequence[str], rows: Sequence[Row]) -> Reply:
    """``getData.formatResponse(format, List<Object[]>, columns)``."""
    if not rows:
        return empty_ok()
    kind = "json" if fmt is None else fmt.lower()
    if kind == "json":
        return Reply(200, jettison_json(columns, rows), "application/json")
    if kind == "html":
        return Reply(200, html_rows(columns, rows), "text/html")
    if kind == "xml":
        return Reply(200, xml_rows(columns, rows), "application/xml")
    if kind in ("csv", "csvquoted"):
        return Reply(200, csv_quoted(columns, rows), "text/csv")
    if kind == "csv-download":
        return Reply(200, csv_quoted(columns, rows), "text/csv",
                     [("Content-Disposition", CSV_DOWNLOAD_NAME)])
    return server_error()


def format_values(fmt: str | None, column: str, values: Sequence[Value]) -> Reply:
    """``getData.formatResponse(format, List<String>, column)`` (no csvquoted here)."""
    if not values:
        return empty_ok()
    kind = "json" if fmt is None else fmt.lower()
    rows = [(v,) for v in values]
    if kind == "json":
        return Reply(200, jettison_json((column,), rows), "application/json")
    if kind == "html":
        return Reply(200, html_rows((column,), rows), "text/html")
    if kind == "xml":
        return Reply(200, xml_rows((column,), rows), "application/xml")
    if kind == "csv":
        return Reply(200, csv_single(column, values), "text/csv")
    if kind == "csv-download":
        return Reply(200, csv_single(column, values), "application/force-download",
                     [("Content-Disposition", CSV_DOWNLOAD_NAME)])
    return server_error()


def jackson(obj: object) -> Reply:
    """Jackson keeps nulls and writes an empty list as ``[]``."""
    return Reply(200, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
                 "application/json")


def _csv_text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _java_type(value: Value) -> str:
    if isinstance(value, Timestamp):
        return Timestamp.java_type
    if isinstance(value, bool):
        return "java.lang.Boolean"
    if isinstance(value, int):
        return "java.lang.Integer" if -(2**31) <= value < 2**31 else "java.lang.Long"
    if isinstance(value, float):
        return "java.lang.Double"
    return "java.lang.String"


# --- dates ------------------------------------------------------------------------------

def ts_v1(value: dt.date | dt.datetime | None) -> Timestamp | None:
    """``java.sql.Timestamp.toString()`` with whole seconds: ``2016-07-21 00:00:00.0``."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    return Timestamp(value.strftime("%Y-%m-%d %H:%M:%S") + ".0")


def date_v4(value: dt.date | dt.datetime | None) -> str | None:
    """MySQL ``date_format(x, '%m-%d-%Y')``."""
    return None if value is None else value.strftime("%m-%d-%Y")


def date_legacy(value: dt.date | dt.datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d")


# --- row shapes -------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesView:
    """A series with everything its rows need (patient, study, collection facts)."""

    series: SeriesRecord
    study: StudyRecord | None
    patient: PatientRecord | None
    facts: CollectionFacts


PATIENT_V1 = ("PatientId", "PatientName", "PatientBirthDate", "PatientSex", "EthnicGroup",
              "Collection", "Phantom", "SpeciesCode", "SpeciesDescription")
PATIENT_V4 = ("PatientId", "PatientName", "PatientSex", "EthnicGroup", "Collection",
              "Phantom", "SpeciesCode", "SpeciesDescription", "Authorized")


def patient_row(p: PatientRecord, v4: bool) -> Row:
    # PatientDAOImpl.fillInHuman: NULL phantom/species become the human defaults.
    species = (p.phantom or "NO", p.species_code or HUMAN_SPECIES_CODE,
               p.species_description or HUMAN_SPECIES)
    if v4:
        return (p.patient_id, p.patient_name, p.patient_sex, p.ethnic_group, p.collection,
                *species, 1)
    return (p.patient_id, p.patient_name, ts_v1(p.patient_birth_date), p.patient_sex,
            p.ethnic_group, p.collection, *species)


STUDY_V1 = ("StudyInstanceUID", "StudyDate", "StudyDescription", "AdmittingDiagnosesDescription",
            "StudyID", "PatientAge", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
            "EthnicGroup", "Collection", "SeriesCount", "LongitudinalTemporalEventType",
            "LongitudinalTemporalOffsetFromEvent")
STUDY_V4 = tuple(c for c in STUDY_V1 if c != "PatientBirthDate") + ("Authorized",)


def study_row(st: StudyRecord, p: PatientRecord | None, series_count: int, v4: bool) -> Row:
    head = (st.study_instance_uid, date_v4(st.study_date) if v4 else ts_v1(st.study_date),
            st.study_description, st.admitting_diagnoses_description, st.study_id,
            st.patient_age, st.patient_id, p.patient_name if p else None)
    tail = (p.patient_sex if p else None, p.ethnic_group if p else None, st.collection,
            series_count, st.longitudinal_temporal_event_type,
            st.longitudinal_temporal_offset_from_event)
    if v4:
        return (*head, *tail, 1)
    return (*head, ts_v1(p.patient_birth_date) if p else None, *tail)


SERIES_V1 = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
             "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag",
             "Collection", "PatientID", "Manufacturer", "ManufacturerModelName",
             "SoftwareVersions", "ImageCount", "TimeStamp", "LicenseName", "LicenseURI",
             "CollectionURI", "FileSize", "DateReleased", "StudyDesc", "StudyDate",
             "ThirdPartyAnalysis")
SERIES_V4 = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
             "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag",
             "Collection", "Site", "PatientID", "PatientSex", "PatientAge",
             "AdmittingDiagnosisDescription", "Manufacturer", "ManufacturerModelName",
             "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName",
             "LicenseURI", "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased",
             "StudyDesc", "StudyDate", "ThirdPartyAnalysis", "Authorized")
UPDATED_SERIES_V1 = SERIES_V1[:15] + ("DateReleased",)
CART_SERIES = SERIES_V1[:15] + ("Date Released",)


def _series_head(s: SeriesRecord, series_date: Value) -> tuple[Value, ...]:
    return (s.series_instance_uid, s.study_instance_uid, s.modality, s.protocol_name,
            series_date, s.series_description, s.body_part_examined, s.series_number,
            s.annotations_flag)


def series_row_v1(view: SeriesView) -> Row:
    s, st, f = view.series, view.study, view.facts
    return (*_series_head(s, ts_v1(s.series_date)), s.collection, s.patient_id,
            s.manufacturer, s.manufacturer_model_name, s.software_versions, s.image_count,
            ts_v1(s.max_submission_timestamp), f.license_name, f.license_uri, f.doi,
            s.file_size, ts_v1(f.date_released), st.study_description if st else None,
            ts_v1(st.study_date) if st else None, s.third_party_analysis)


def updated_series_row_v1(view: SeriesView) -> Row:
    """v1/v2 getUpdatedSeries and getContentsByName: 15 series columns plus the release."""
    s = view.series
    return (*_series_head(s, ts_v1(s.series_date)), s.collection, s.patient_id,
            s.manufacturer, s.manufacturer_model_name, s.software_versions, s.image_count,
            ts_v1(view.facts.date_released))


def series_row_v4(view: SeriesView) -> Row:
    s, st, p, f = view.series, view.study, view.patient, view.facts
    return (*_series_head(s, date_v4(s.series_date)), s.collection, f.site, s.patient_id,
            p.patient_sex if p else None, st.patient_age if st else None,
            st.admitting_diagnoses_description if st else None, s.manufacturer,
            s.manufacturer_model_name, s.software_versions, s.image_count,
            date_v4(s.max_submission_timestamp), f.license_name, f.license_uri, f.doi,
            s.file_size, "Yes", date_v4(f.date_released),
            st.study_description if st else None, date_v4(st.study_date) if st else None,
            s.third_party_analysis, 1)


SERIES_METADATA_V1 = ("Series UID", "Collection", "3rd Party Analysis", "Data Description URI",
                      "Subject ID", "Study UID", "Study Description", "Study Date",
                      "Series Description", "Manufacturer", "Modality", "SOP Class UID",
                      "Number of Images", "File Size", "File Location", "Series Number",
                      "License Name", "License URL", "Annotation Size", "Date Released",
                      "Series Date", "Protocol Name", "Body Part Examined", "Annotations Flag",
                      "Manufacturer Model Name", "Software Versions", "TimeStamp")


def _keep(value: str | None, allowed: str) -> str | None:
    """Java ``replaceAll("[^a-zA-Z0-9 .-]", "")`` on the descriptions."""
    if value is None:
        return None
    return "".join(ch for ch in value if ch.isascii() and (ch.isalnum() or ch in allowed))


def _str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def series_number_text(value: int | None) -> str | None:
    # The series number column is a float in the NBIA DB: "1.000000".
    return None if value is None else f"{value:.6f}"


def series_metadata_row_v1(view: SeriesView, sop_class_uid: str | None) -> Row:
    """v1/v2 getSeriesMetaData: every value a string (``Util.nullSafeString``)."""
    s, st, f = view.series, view.study, view.facts
    manufacturer = s.manufacturer.replace(",", " ") if s.manufacturer else s.manufacturer
    return (s.series_instance_uid, s.collection, s.third_party_analysis, f.doi, s.patient_id,
            s.study_instance_uid, _keep(st.study_description if st else None, " .-"),
            date_v4(st.study_date) if st else None, _keep(s.series_description, " .-"),
            manufacturer, s.modality, sop_class_uid, str(s.image_count), str(s.file_size),
            st.study_id if st else None, series_number_text(s.series_number),
            f.license_name, f.license_uri, "0", ts_v1(f.date_released), ts_v1(s.series_date),
            s.protocol_name, s.body_part_examined, _str(s.annotations_flag),
            s.manufacturer_model_name, s.software_versions,
            ts_v1(s.max_submission_timestamp))


SERIES_METADATA_V4 = ("PatientID", "PatientName", "PatientSex", "EthnicGroup", "Phantom",
                      "SpeciesCode", "SpeciesDescription", "StudyInstanceUID", "StudyDate",
                      "StudyDesc", "AdmittingDiagnosisDescription", "StudyID", "PatientAge",
                      "LongitudinalTemporalEventType", "LongitudinalTemporalOffsetFromEvent",
                      "SeriesInstanceUID", "Collection", "Site", "Modality", "ProtocolName",
                      "SeriesDate", "SeriesDescription", "BodyPartExamined", "SeriesNumber",
                      "AnnotationsFlag", "Manufacturer", "ManufacturerModelName",
                      "PixelSpacing(mm)-Row", "SliceThickness(mm)", "SoftwareVersions",
                      "ImageCount", "MaxSubmissionTimestamp", "LicenseName", "LicenseURI",
                      "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased",
                      "ThirdPartyAnalysis", "Authorized")


def series_metadata_row_v4(view: SeriesView) -> Row:
    """v4 getSeriesMetadata: the query uses ``addScalar(StringType)``, so all strings."""
    s, st, p, f = view.series, view.study, view.patient, view.facts
    return (s.patient_id, p.patient_name if p else None, p.patient_sex if p else None,
            p.ethnic_group if p else None, (p.phantom if p else None) or "NO",
            (p.species_code if p else None) or HUMAN_SPECIES_CODE,
            (p.species_description if p else None) or HUMAN_SPECIES,
            s.study_instance_uid, date_v4(st.study_date) if st else None,
            st.study_description if st else None,
            st.admitting_diagnoses_description if st else None, st.study_id if st else None,
            st.patient_age if st else None,
            st.longitudinal_temporal_event_type if st else None,
            _str(st.longitudinal_temporal_offset_from_event) if st else None,
            s.series_instance_uid, s.collection, f.site, s.modality, s.protocol_name,
            date_v4(s.series_date), s.series_description, s.body_part_examined,
            series_number_text(s.series_number), _str(s.annotations_flag), s.manufacturer,
            s.manufacturer_model_name, s.pixel_spacing_row, s.slice_thickness,
            s.software_versions, str(s.image_count), date_v4(s.max_submission_timestamp),
            f.license_name, f.license_uri, f.doi, str(s.file_size), "Yes",
            date_v4(f.date_released), s.third_party_analysis, "1")


# --- ZIP helpers ------------------------------------------------------------------------

def license_text(facts: CollectionFacts | None) -> str:
    """``ImageDAO2Impl.getLicenseContent`` with the ``licenseText`` template."""
    collection = facts.name if facts else "Not Specified"
    short = (facts.license_short if facts else None) or "Not Specified"
    url = (facts.license_uri if facts else None) or "Not Specified"
    return (f"License Information. The {collection} collection is distributed under the "
            f"{short} at {url} By downloading the data, you agree to abide by terms of "
            "this license.")


def md5_csv(names_and_hashes: Iterable[tuple[str, str]]) -> bytes:
    """``md5hashes.csv``: ``Filename,MD5Hash``, lowercase hex, HashMap (unordered) rows."""
    return csv_plain(("Filename", "MD5Hash"), [(n, h.lower()) for n, h in names_and_hashes])


def default_order(instances: Sequence[InstanceRecord]) -> list[InstanceRecord]:
    """The fixed "DB order" of getImage: deterministic but not instance order."""
    return sorted(instances, key=lambda i: (i.md5, i.sop_instance_uid))


def sequential_names(instances: Sequence[InstanceRecord]) -> list[tuple[str, InstanceRecord]]:
    return [(f"{n:08d}.dcm", inst) for n, inst in enumerate(default_order(instances), 1)]


def new_file_names(instances: Sequence[InstanceRecord]) -> list[tuple[str, InstanceRecord]]:
    """``NewFileNames=Yes``: ``<acq>-<inst>.dcm`` (``ImageDAO2Impl.setNewFileNames``).

    Sorted by InstanceNumber (NULL first); ``acq`` counts AcquisitionNumber changes from
    1 and ``inst`` restarts at 1 on each change; ``inst`` is zero-padded to the number of
    digits of the image count (133 images: ``1-001``; 5 images: ``1-1``).
    """
    ordered = sorted(instances, key=lambda i: (i.instance_number is not None,
                                               i.instance_number or 0))
    width = len(str(len(ordered)))
    names: list[tuple[str, InstanceRecord]] = []
    acq, number = 0, 0
    previous: object = object()  # matches no acquisition number, not even None
    for inst in ordered:
        if inst.acquisition_number != previous:
            acq, number, previous = acq + 1, 0, inst.acquisition_number
        number += 1
        names.append((f"{acq}-{number:0{width}d}.dcm", inst))
    return names


# --- legacy Bindaas shapes (old v1 key spellings, ISO dates) -----------------------------

LEGACY_PATIENT = ("PatientID", "PatientName", "PatientSex", "EthnicGroup", "Collection")
LEGACY_STUDY = ("StudyInstanceUID", "StudyDate", "StudyDescription",
                "AdmittingDiagnosesDescription", "StudyID", "PatientAge", "PatientID",
                "PatientName", "PatientSex", "EthnicGroup", "Collection", "SeriesCount")
LEGACY_SERIES = SERIES_V1[:15]


def legacy_patient_row(p: PatientRecord) -> Row:
    return (p.patient_id, p.patient_name, p.patient_sex, p.ethnic_group, p.collection)


def legacy_study_row(st: StudyRecord, p: PatientRecord | None, series_count: int) -> Row:
    return (st.study_instance_uid, date_legacy(st.study_date), st.study_description,
            st.admitting_diagnoses_description, st.study_id, st.patient_age, st.patient_id,
            p.patient_name if p else None, p.patient_sex if p else None,
            p.ethnic_group if p else None, st.collection, series_count)


def legacy_series_row(view: SeriesView) -> Row:
    s = view.series
    return (*_series_head(s, date_legacy(s.series_date)), s.collection, s.patient_id,
            s.manufacturer, s.manufacturer_model_name, s.software_versions, s.image_count)


# --- getDicomTags (NCIADicomTextObject) ---------------------------------------------------

_PIXEL_DATA = 0x7FE00010
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})


def dicom_tag_rows(dataset: object) -> list[dict[str, str | None]]:
    """File meta then data set, as dcm4che walks them; parsing stops at Pixel Data."""
    rows: list[dict[str, str | None]] = []
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        _walk_tags(meta, "", rows)
    _walk_tags(dataset, "", rows)
    return rows


def _walk_tags(dataset: object, prefix: str, rows: list[dict[str, str | None]]) -> None:
    for elem in dataset:  # type: ignore[attr-defined]
        if elem.tag == _PIXEL_DATA and not prefix:
            return
        element = prefix + f"({elem.tag.group:04X},{elem.tag.element:04X})"
        name = _tag_name(elem.tag)
        data = _tag_data(elem)
        rows.append({"element": element, "name": name, "data": data})
        if elem.VR == "SQ":
            for item in elem.value or []:
                _walk_tags(item, prefix + ">", rows)
            rows.append({"element": element, "name": "End " + name, "data": data})


def _tag_name(tag: int) -> str:
    try:  # private and unknown tags have no dictionary entry: dcm4che shows ""
        return datadict.dictionary_description(tag)
    except KeyError:
        return ""


def _tag_data(elem: object) -> str | None:
    tag, vr, value = elem.tag, elem.VR, elem.value  # type: ignore[attr-defined]
    if tag.group >= 0x6000:
        return "..."
    if vr == "SQ" or vr in _BINARY_VRS or isinstance(value, bytes | bytearray):
        return None
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(_tag_text(v) for v in value)
    return _tag_text(value)


def _tag_text(value: object) -> str:
    original = getattr(value, "original_string", None)  # DS/IS exactly as written
    return original if isinstance(original, str) else str(value)
