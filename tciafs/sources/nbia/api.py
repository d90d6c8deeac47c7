"""The NBIA API generations on the wire: paths, parameter spellings, response keys.

Everything here is pure (no I/O), so each generation's shapes are testable from literal
bodies. The facts below are how the services answer, which is not always what their
documentation says:

- v4 is strict about parameter names (an unknown one is a 400), v1/v2 ignore unknown
  ones and then return *everything*, so we send only the spellings each endpoint knows
  and re-filter rows client-side.
- getPatient filters by `PatientId`; every other endpoint says `PatientID`.
- v4 says `MaxSubmissionTimestamp`/`DataDescriptionURI` and dates `MM-DD-YYYY`; v1/v2 say
  `TimeStamp`/`CollectionURI` and Java Timestamps `YYYY-MM-DD HH:MM:SS.0`.
- Counts and sizes are JSON numbers, except legacy Bindaas `TotalSizeInBytes` ("123.0")
  and getSeriesMetaData, which are strings. Parsers accept either.
- An empty 200 body is the server's empty list; `{}` rows stand for NULLs and are skipped.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from tciafs.sources.base import Collection, MalformedResponse, Patient, Series, Study

log = logging.getLogger("tciafs.client")

API_NAMES = ("v4", "v2", "v1", "legacy")


@dataclass(frozen=True)
class Generation:
    name: str  # "v4" | "v2" | "v1" | "legacy"
    bearer: str  # when to send a token: "never" | "credentials" | "always"
    v4_shapes: bool  # v4 keys and MM-DD-YYYY dates (else v1/v2 keys and Timestamps)
    fallback: str | None = None  # a generation to retry public requests on when this fails
    extra_params: Mapping[str, str] = field(default_factory=dict)

    def base_path(self, api_key: str | None = None) -> str:
        if self.name == "legacy":
            # The keyed v3 flavour of Bindaas; the keyless v4 one is what survived.
            return "/services/v3/TCIA/query/" if api_key else "/services/v4/TCIA/query/"
        return f"/nbia-api/services/{self.name}/"


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", bearer="credentials", v4_shapes=True),
    # v2 answers 500 or an empty 200 without a token, so it always gets one (guest if need be).
    "v2": Generation("v2", bearer="always", v4_shapes=False, fallback="v1"),
    "v1": Generation("v1", bearer="never", v4_shapes=False),
    "legacy": Generation("legacy", bearer="never", v4_shapes=False,
                         extra_params={"format": "json"}),
}


def generation(name: str) -> Generation:
    try:
        return GENERATIONS[name]
    except KeyError:
        raise ValueError(f"unknown API generation {name!r}; expected one of "
                         f"{', '.join(API_NAMES)}") from None


@dataclass(frozen=True)
class Request:
    """One API call: endpoint and query parameters (never a secret: those go in headers)."""

    endpoint: str
    params: dict[str, str]
    binary: bool = False  # an image or ZIP body, not a JSON listing

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if k != "format")
        return f"{self.endpoint}({args})"


def _request(gen: Generation, endpoint: str, params: Mapping[str, str | None],
             *, binary: bool = False) -> Request:
    # Empty values are dropped: `Collection=` filters to "" on the server and finds nothing.
    clean = {k: v for k, v in params.items() if v}
    if not binary:
        clean.update(gen.extra_params)
    return Request(endpoint, clean, binary)


def collections_request(gen: Generation) -> Request:
    return _request(gen, "getCollectionValues", {})


def patients_request(gen: Generation, collection: str, patient_id: str | None = None
                     ) -> Request:
    # getPatient alone spells its filter PatientId; v4 rejects PatientID here with a 400.
    return _request(gen, "getPatient", {"Collection": collection, "PatientId": patient_id})


def studies_request(gen: Generation, collection: str, patient_id: str | None) -> Request:
    return _request(gen, "getPatientStudy", {"Collection": collection, "PatientID": patient_id})


def series_request(gen: Generation, collection: str, patient_id: str | None,
                   study_uid: str | None) -> Request:
    return _request(gen, "getSeries", {"Collection": collection, "PatientID": patient_id,
                                       "StudyInstanceUID": study_uid})


def series_by_uid_request(gen: Generation, series_uid: str) -> Request:
    return _request(gen, "getSeries", {"SeriesInstanceUID": series_uid})


def cart_request(gen: Generation, name: str) -> Request:
    # A shared cart: v1/v2 only (v4 never got it); Bindaas spelled it without "get".
    endpoint = "ContentsByName" if gen.name == "legacy" else "getContentsByName"
    return _request(gen, endpoint, {"name": name})


def instance_uids_request(gen: Generation, series_uid: str) -> Request:
    return _request(gen, "getSOPInstanceUIDs", {"SeriesInstanceUID": series_uid})


def series_size_request(gen: Generation, series_uid: str) -> Request:
    return _request(gen, "getSeriesSize", {"SeriesInstanceUID": series_uid})


def single_image_request(gen: Generation, series_uid: str, sop_uid: str) -> Request:
    return _request(gen, "getSingleImage",
                    {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}, binary=True)


def image_md5_request(gen: Generation, sop_uid: str) -> Request:
    """One image's MD5: v1 getM5HashForImage, with "M5" and "SOPInstanceUid" spelt as the
    service spells them. v4's getMD5HashForImage is never asked: it reads a parameter
    name that its own check refuses, so it cannot answer (docs/nbia-wire.md, "Single
    images")."""
    return _request(gen, "getM5HashForImage", {"SOPInstanceUid": sop_uid})


def series_zip_request(gen: Generation, series_uid: str, md5: bool) -> Request:
    """The whole-series ZIP; with md5, the flavour that ends with md5hashes.csv."""
    params: dict[str, str | None] = {"SeriesInstanceUID": series_uid}
    if md5 and gen.name == "v4":
        params["IncludeMD5"] = "Yes"  # v4 added this to getImage; LICENSE stays first
        return _request(gen, "getImage", params, binary=True)
    if md5 and gen.name in ("v1", "v2"):
        return _request(gen, "getImageWithMD5Hash", params, binary=True)
    return _request(gen, "getImage", params, binary=True)  # legacy has no MD5 flavour


# -- response bodies ------------------------------------------------------------------


def parse_rows(body: bytes, what: str) -> list[dict[str, Any]]:
    """A JSON listing body as rows; raises MalformedResponse for anything else."""
    text = body.strip()
    if not text:
        return []
    if text[:1] == b"<":
        kind = "HTML" if b"html" in text[:200].lower() else "XML"
        raise MalformedResponse(f"{what}: expected JSON, got {kind}: {_snippet(text)}")
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedResponse(f"{what}: expected JSON, got {_snippet(text)}") from None
    if not isinstance(data, list):
        raise MalformedResponse(
            f"{what}: expected a JSON list of objects, got {type(data).__name__}")
    rows = []
    for item in data:
        if not isinstance(item, dict):
            raise MalformedResponse(
                f"{what}: expected a JSON list of objects, found a {type(item).__name__}")
        if item:  # {} is how Jettison writes a row whose only column is NULL
            rows.append(item)
    return rows


_MD5_HEX = re.compile(rb"[0-9a-f]{32}")


def parse_image_md5(body: bytes, what: str) -> str | None:
    """getM5HashForImage's text/plain answer: the MD5 in lowercase hex, or None for the
    empty answer (an image the guest may not see, or none the service knows)."""
    text = body.strip().lower()
    if not text:
        return None
    if not _MD5_HEX.fullmatch(text):
        raise MalformedResponse(f"{what}: expected an MD5 in hex, got {_snippet(text)}")
    return text.decode("ascii")


def _snippet(text: bytes) -> str:
    return repr(text[:80].decode("utf-8", errors="replace"))


def parse_collections(rows: list[dict[str, Any]], host: str, what: str) -> list[Collection]:
    names = (_ident(row, ("Collection",), what) for row in rows)
    return [Collection(name, host) for name in dict.fromkeys(n for n in names if n)]


def parse_patient(row: Mapping[str, Any], collection: str, what: str) -> Patient | None:
    patient_id = _ident(row, ("PatientId", "PatientID"), what)
    if patient_id is None:
        return None
    return Patient(
        collection=_text(row, "Collection") or collection,
        patient_id=patient_id,
        patient_name=_text(row, "PatientName"),
        patient_sex=_text(row, "PatientSex"),
        ethnic_group=_text(row, "EthnicGroup"),
        species_description=_text(row, "SpeciesDescription"),
        phantom=_text(row, "Phantom"),
    )


def parse_study(row: Mapping[str, Any], gen: Generation, collection: str,
                patient_id: str | None, what: str) -> Study | None:
    study_uid = _ident(row, ("StudyInstanceUID",), what)
    pid = _ident(row, ("PatientID", "PatientId"), what) or patient_id
    if study_uid is None or pid is None:
        return None
    return Study(
        collection=_text(row, "Collection") or collection,
        patient_id=pid,
        study_uid=study_uid,
        study_date=_date(row, gen, "StudyDate"),
        study_description=_text(row, "StudyDescription", "StudyDesc"),
        study_id=_text(row, "StudyID"),
        patient_age=_text(row, "PatientAge"),
        series_count=_int(row, "SeriesCount"),
    )


def parse_series(row: Mapping[str, Any], gen: Generation, collection: str,
                 what: str) -> Series | None:
    series_uid = _ident(row, ("SeriesInstanceUID",), what)
    study_uid = _ident(row, ("StudyInstanceUID",), what)
    patient_id = _ident(row, ("PatientID", "PatientId"), what)
    if series_uid is None or study_uid is None or patient_id is None:
        return None
    uri_keys = ("DataDescriptionURI", "CollectionURI")
    stamp_keys = ("MaxSubmissionTimestamp", "TimeStamp")
    if not gen.v4_shapes:
        uri_keys, stamp_keys = uri_keys[::-1], stamp_keys[::-1]
    return Series(
        collection=_text(row, "Collection") or collection,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=_text(row, "Modality"),
        series_description=_text(row, "SeriesDescription"),
        series_number=_float(row, "SeriesNumber"),
        body_part=_text(row, "BodyPartExamined"),
        image_count=_int(row, "ImageCount"),
        file_size=_int(row, "FileSize"),
        manufacturer=_text(row, "Manufacturer"),
        manufacturer_model=_text(row, "ManufacturerModelName"),
        protocol_name=_text(row, "ProtocolName"),
        series_date=_date(row, gen, "SeriesDate"),
        study_date=_date(row, gen, "StudyDate"),
        study_description=_text(row, "StudyDesc", "StudyDescription"),
        license_name=_text(row, "LicenseName"),
        license_uri=_text(row, "LicenseURI"),
        data_description_uri=_text(row, *uri_keys),
        date_released=_date(row, gen, "DateReleased", "Date Released"),
        software_versions=_text(row, "SoftwareVersions"),
        third_party_analysis=_text(row, "ThirdPartyAnalysis"),
        submission_date=_date(row, gen, *stamp_keys),
    )


def parse_instance_uids(rows: list[dict[str, Any]], what: str) -> list[str]:
    uids = (_ident(row, ("SOPInstanceUID",), what) for row in rows)
    return list(dict.fromkeys(u for u in uids if u))


def parse_series_size(rows: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(TotalSizeInBytes, ObjectCount), or None when the server knows no such series."""
    for row in rows:
        size, count = _int(row, "TotalSizeInBytes"), _int(row, "ObjectCount")
        if size is not None and count is not None:
            return size, count
    return None


# -- field coercion -------------------------------------------------------------------


def _ident(row: Mapping[str, Any], keys: tuple[str, ...], what: str) -> str | None:
    """A key field (UID, patient id, collection): a string, or None when absent."""
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return value if value.strip() else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise MalformedResponse(f"{what}: {key} is a {type(value).__name__}, not a string")
    return None


def _text(row: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    return None


def _number(row: Mapping[str, Any], key: str) -> Decimal | None:
    value = row.get(key)
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(str(value).strip()) if isinstance(value, str | int | float) else None
    except InvalidOperation:
        return None
    return number if number is not None and number.is_finite() else None


def _int(row: Mapping[str, Any], key: str) -> int | None:
    number = _number(row, key)
    if number is None or number != number.to_integral_value():
        return None
    return int(number)


def _float(row: Mapping[str, Any], key: str) -> float | None:
    number = _number(row, key)
    return None if number is None else float(number)


_V4_DATE = "%m-%d-%Y"
_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d", "%Y/%m/%d")


def parse_date(value: object, v4_first: bool = True) -> datetime.date | None:
    """A wire date in any of the formats NBIA has used, or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    formats = (_V4_DATE, *_DATE_FORMATS) if v4_first else (*_DATE_FORMATS, _V4_DATE)
    for fmt in formats:
        try:
            return datetime.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    log.debug("unparseable date %r", text)
    return None


def _date(row: Mapping[str, Any], gen: Generation, *keys: str) -> datetime.date | None:
    for key in keys:
        if key in row:
            return parse_date(row[key], gen.v4_shapes)
    return None


def is_missing_endpoint(status: int, body: bytes) -> bool:
    """A 404, or NBIA's 500 that wraps its web framework's 404: no such path here."""
    return status == 404 or (status == 500 and b"404 not found" in body[:4096].lower())


def is_not_authorised_text(text: str) -> bool:
    """NBIA's 400 texts for an unknown or unauthorised series (v2/v4 and v1 wording)."""
    lowered = text.lower()
    return "not been granted" in lowered or "not in public domain" in lowered
