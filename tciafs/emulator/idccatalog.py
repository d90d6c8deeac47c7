"""IDC's catalog of the emulator's buckets, in the schema of the real one.

IDC publishes its catalog as parquet files, one row per series (`idc_index.parquet`)
and one per collection (`collections_index.parquet`); docs/idc.md lists their columns.
This module makes both from what the buckets hold, with the same column names and
types, so a reader of the real files reads these. The emulator serves them at
``/_emulator/idc/<file>`` on its S3 port.

Writing parquet needs pyarrow (the `idc` extra): parquet is a columnar, compressed,
binary format that nobody should write by hand. Without pyarrow the emulator still
runs; only the catalog is not offered, and asking for it says why.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import re
import threading
from collections.abc import Callable
from typing import Any

from tciafs.emulator.idc import BucketSeries, Holdings
from tciafs.emulator.model import CollectionFacts, StudyRecord
from tciafs.emulator.profiles import AnalysisResult, Licence
from tciafs.emulator.wire import Reply

INDEX = "idc_index.parquet"
COLLECTIONS = "collections_index.parquet"
FILES = (INDEX, COLLECTIONS)
NEEDS_PYARROW = ("the IDC catalog is written as parquet, which needs pyarrow: "
                 "pip install 'tciafs[idc]'")

Row = dict[str, Any]


def pyarrow_missing() -> str | None:
    """Why the catalog cannot be made here, or None when it can."""
    return None if importlib.util.find_spec("pyarrow") is not None else NEEDS_PYARROW


def collection_id(name: str) -> str:
    """IDC's identifier of a collection: its name in lower case, every run of other
    characters one underscore ("LIDC-IDRI" is lidc_idri)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# --- idc_index: one row per series --------------------------------------------------------

#: The data release the emulated catalog claims: series first appeared and were last revised
#: in it (series_init_idc_version, series_revised_idc_version).
RELEASE = 25
#: The catalog's version, in the files' metadata as the real package writes its own.
VERSION = f"{RELEASE}.0.0+tciafs.emulator"


def _study(series: BucketSeries) -> StudyRecord | None:
    record = series.record
    return next((s for s in series.archive.studies(record.collection, record.patient_id)
                 if s.study_instance_uid == record.study_instance_uid), None)


def _iso(day: dt.date | None) -> str | None:
    return day.isoformat() if day else None


def _header(series: BucketSeries) -> Callable[[str], str | None]:
    """Values of the first instance's header (the generated archives read it without
    drawing a pixel), and of its file meta information."""
    found: Any = series.archive.dicom_tags(series.record.series_instance_uid)

    def get(keyword: str) -> str | None:
        for where in (found, getattr(found, "file_meta", None)):
            value = getattr(where, keyword, None) if where is not None else None
            if value is not None and str(value) != "":
                return str(value)
        return None
    return get


def _uid_name(uid: str | None) -> str | None:
    from pydicom.uid import UID

    return UID(uid).name if uid else None


def series_row(series: BucketSeries) -> Row:
    record, study, header = series.record, _study(series), _header(series)
    patient = next((p for p in series.archive.patients(record.collection)
                    if p.patient_id == record.patient_id), None)
    analysis = series.analysis
    sop_class, syntax = header("SOPClassUID"), header("TransferSyntaxUID")
    return {
        "collection_id": collection_id(record.collection),
        "analysis_result_id": analysis.analysis_result_id if analysis else None,
        "PatientID": record.patient_id,
        "SeriesInstanceUID": record.series_instance_uid,
        "StudyInstanceUID": record.study_instance_uid,
        "source_DOI": bare_doi(analysis.doi if analysis else series.facts.doi),
        "PatientAge": study.patient_age if study else None,
        "PatientSex": patient.patient_sex if patient else None,
        "StudyDate": _iso(study.study_date) if study else None,
        "StudyDescription": study.study_description if study else None,
        "BodyPartExamined": record.body_part_examined,
        "Modality": record.modality,
        "SOPClassUID": sop_class,
        "sop_class_name": _uid_name(sop_class),
        "TransferSyntaxUID": syntax,
        "transfer_syntax_name": _uid_name(syntax),
        "PhotometricInterpretation": header("PhotometricInterpretation"),
        "PixelRepresentation": header("PixelRepresentation"),
        "Manufacturer": record.manufacturer,
        "ManufacturerModelName": record.manufacturer_model_name,
        "SeriesDate": _iso(record.series_date),
        "SeriesDescription": record.series_description,
        "SeriesNumber": None if record.series_number is None else str(record.series_number),
        "instanceCount": record.image_count,
        "license_short_name": (analysis.licence["license_short"] if analysis
                               else series.facts.license_short),
        "series_init_idc_version": RELEASE,
        "series_revised_idc_version": RELEASE,
        "aws_bucket": series.bucket,
        "crdc_series_uuid": series.uuid,
        "series_aws_url": f"s3://{series.bucket}/{series.prefix}*",
        "series_size_MB": record.file_size / 1e6,
    }


def bare_doi(url: str) -> str:
    """A DOI as IDC writes it: lower case, without the resolver."""
    return re.sub(r"^https?://(dx\.)?doi\.org/", "", url).lower()


# --- collections_index: one row per collection ------------------------------------------

def _citation(title: str, doi: str) -> str:
    return f"<i>{title}</i> [Data set]. The Cancer Imaging Archive (emulated). {doi}"


def _source(source_id: str, title: str, kind: str, doi: str, licence: Licence,
            modalities: str) -> Row:
    return {
        "source_id": source_id, "source_title": title, "source_type": kind,
        "source_doi": bare_doi(doi), "source_url": f"https://doi.org/{bare_doi(doi)}",
        "modalities": modalities,
        "license": {"license_url": licence["license_uri"],
                    "license_long_name": licence["license_name"],
                    "license_short_name": licence["license_short"]},
        "citation": _citation(title, doi),
        "provenance": None if kind == "analysis_result" else {
            "data_contributor": "TCIA", "source_data_provider": "UNKNOWN",
            "deidentification_party": "TCIA", "dicom_conversion_by": "NOT_APPLICABLE"},
        "Access": "Public", "ImageTypes": modalities,
    }


def collection_row(facts: CollectionFacts, series: list[BucketSeries]) -> Row:
    def modalities(of: list[BucketSeries]) -> str:
        return ", ".join(sorted({s.record.modality for s in of}))

    licence = Licence(license_name=facts.license_name, license_short=facts.license_short,
                      license_uri=facts.license_uri)
    original = [s for s in series if s.analysis is None]
    sources = [_source(collection_id(facts.name), f"Data From {facts.name}", "original_data",
                       facts.doi, licence, modalities(original))]
    analyses: list[AnalysisResult] = []
    for item in series:
        if item.analysis is not None and item.analysis not in analyses:
            analyses.append(item.analysis)
    sources += [_source(a.analysis_result_id, a.title, "analysis_result", a.doi, a.licence,
                        modalities([s for s in series if s.analysis == a])) for a in analyses]
    return {"collection_name": facts.name, "collection_id": collection_id(facts.name),
            "cancer_types": None, "tumor_locations": None,
            "subjects": len({s.record.patient_id for s in series}), "species": "Human",
            "sources": sources, "supporting_data": None, "program_id": "community",
            "status": "Complete", "updated": facts.date_released.isoformat(),
            "description": facts.description}


def rows(holdings: Holdings) -> tuple[list[Row], list[Row]]:
    """The rows of idc_index and of collections_index."""
    series = holdings.series()
    by_collection: dict[str, list[BucketSeries]] = {}
    for item in series:
        by_collection.setdefault(item.facts.name, []).append(item)
    collections = [collection_row(items[0].facts, items)
                   for _name, items in sorted(by_collection.items())]
    return [series_row(s) for s in series], collections


# --- parquet ------------------------------------------------------------------------------

#: Column types of the real files (idc-index-data 25.0.5): large strings at the top level,
#: strings inside the sources' structs.
INDEX_COLUMNS = (
    "collection_id", "analysis_result_id", "PatientID", "SeriesInstanceUID",
    "StudyInstanceUID", "source_DOI", "PatientAge", "PatientSex", "StudyDate",
    "StudyDescription", "BodyPartExamined", "Modality", "SOPClassUID", "sop_class_name",
    "TransferSyntaxUID", "transfer_syntax_name", "PhotometricInterpretation",
    "PixelRepresentation", "Manufacturer", "ManufacturerModelName", "SeriesDate",
    "SeriesDescription", "SeriesNumber", "instanceCount", "license_short_name",
    "series_init_idc_version", "series_revised_idc_version", "aws_bucket", "crdc_series_uuid",
    "series_aws_url", "series_size_MB")
_INDEX_INTEGERS = ("instanceCount", "series_init_idc_version", "series_revised_idc_version")


def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa  # the idc extra

    text, meta = pa.large_string(), {"idc_index_data_version": VERSION}
    index = pa.schema([(name, pa.int64() if name in _INDEX_INTEGERS
                        else pa.float64() if name == "series_size_MB" else text)
                       for name in INDEX_COLUMNS], metadata=meta)
    inner = pa.string()
    source = pa.struct([
        ("source_id", inner), ("source_title", inner), ("source_type", inner),
        ("source_doi", inner), ("source_url", inner), ("modalities", inner),
        ("license", pa.struct([("license_url", inner), ("license_long_name", inner),
                               ("license_short_name", inner)])),
        ("citation", inner),
        ("provenance", pa.struct([("data_contributor", inner),
                                  ("source_data_provider", inner),
                                  ("deidentification_party", inner),
                                  ("dicom_conversion_by", inner)])),
        ("Access", inner), ("ImageTypes", inner)])
    collections = pa.schema([
        ("collection_name", text), ("collection_id", text), ("cancer_types", text),
        ("tumor_locations", text), ("subjects", pa.int64()), ("species", text),
        ("sources", pa.list_(source)), ("supporting_data", text), ("program_id", text),
        ("status", text), ("updated", text), ("description", text)], metadata=meta)
    return index, collections


def write_parquet(holdings: Holdings) -> dict[str, bytes]:
    """Both files' bytes, by name. ImportError without pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index_schema, collections_schema = _schemas()
    index_rows, collection_rows = rows(holdings)
    out: dict[str, bytes] = {}
    for name, schema, data in ((INDEX, index_schema, index_rows),
                               (COLLECTIONS, collections_schema, collection_rows)):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(data, schema=schema), sink)
        out[name] = sink.getvalue()
    return out


class Catalog:
    """The catalog files of one set of holdings, made once, on first request."""

    def __init__(self, holdings: Holdings,
                 make: Callable[[Holdings], dict[str, bytes]] = write_parquet) -> None:
        self._holdings = holdings
        self._make = make
        self._lock = threading.Lock()
        self._files: dict[str, bytes] | None = None

    def files(self) -> dict[str, bytes]:
        with self._lock:
            if self._files is None:
                self._files = self._make(self._holdings)
            return self._files

    def reply(self, name: str) -> Reply:
        """The answer to GET /_emulator/idc/<name>: a file, or the list of them ("")."""
        if name not in ("", *FILES):
            return Reply(404, b"Not Found", "text/plain")
        why = pyarrow_missing()
        if why is not None:
            return Reply(501, why.encode(), "text/plain")
        if not name:
            listing = {f: len(data) for f, data in self.files().items()}
            return Reply(200, json.dumps(listing).encode(), "application/json")
        return Reply(200, self.files()[name], "application/vnd.apache.parquet")
