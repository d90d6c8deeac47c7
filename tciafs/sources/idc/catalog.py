"""IDC's pinned catalog: which collections, patients, studies and series exist, and where.

IDC publishes it as two parquet files (docs/idc.md lists their columns):
`idc_index.parquet`, one row per series, and `collections_index.parquet`, one row per
collection with its name as TCIA spells it and its sources (licence, DOI, citation).
Only the columns the tree needs are read, into per-level lookups, so listing anything
above a series needs no request.

The files come from a path or an http(s) URL, or by default from the installed
`idc-index-data` package, which names its own files (IDC_INDEX_PARQUET_FILEPATH);
collections_index.parquet is looked for beside idc_index.parquet there.
Reading parquet needs pyarrow (the `idc` extra).
"""

from __future__ import annotations

import datetime
import io
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tciafs.sources.base import Collection, CollectionFacts, Patient, Series, Study

INDEX = "idc_index.parquet"
COLLECTIONS = "collections_index.parquet"

#: The columns of idc_index read, and no others: the real file has about thirty.
INDEX_COLUMNS = (
    "collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "crdc_series_uuid", "aws_bucket", "Modality", "SeriesDescription", "SeriesNumber",
    "instanceCount", "series_size_MB", "license_short_name", "source_DOI",
    "analysis_result_id", "StudyDate", "StudyDescription", "BodyPartExamined",
    "Manufacturer")
COLLECTION_COLUMNS = ("collection_name", "collection_id", "sources")

NEEDS_PYARROW = ("the IDC catalog is parquet, which needs pyarrow: "
                 "install tciafs with its idc extra (pip install 'tciafs[idc]')")


class CatalogError(Exception):
    """The catalog cannot be found or read."""


@dataclass(frozen=True, slots=True)
class SeriesPlace:
    """Where a series' objects are: `<bucket>/<uuid>/`."""

    bucket: str
    uuid: str  # crdc_series_uuid

    @property
    def prefix(self) -> str:
        return f"{self.uuid}/"


@dataclass
class IdcCatalog:
    """The catalog in lookups by level; names are TCIA's collection names."""

    collections: dict[str, Collection] = field(default_factory=dict)
    facts: dict[str, CollectionFacts] = field(default_factory=dict)
    patients: dict[str, dict[str, Patient]] = field(default_factory=dict)
    studies: dict[tuple[str, str], dict[str, Study]] = field(default_factory=dict)
    series: dict[str, list[Series]] = field(default_factory=dict)  # by study UID
    by_uid: dict[str, Series] = field(default_factory=dict)
    places: dict[str, SeriesPlace] = field(default_factory=dict)  # by series UID
    version: str | None = None  # idc_index_data_version in the files' metadata

    def series_of(self, collection: str, patient_id: str | None) -> list[Series]:
        return [s for study in self._studies(collection, patient_id)
                for s in self.series.get(study.study_uid, [])]

    def studies_of(self, collection: str, patient_id: str | None) -> list[Study]:
        return list(self._studies(collection, patient_id))

    def _studies(self, collection: str, patient_id: str | None) -> list[Study]:
        patients = [patient_id] if patient_id is not None \
            else list(self.patients.get(collection, {}))
        return [s for p in patients for s in self.studies.get((collection, p), {}).values()]


def default_location() -> str | None:
    """idc_index.parquet of the installed idc-index-data package, if there is one."""
    try:
        import idc_index_data  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = getattr(idc_index_data, "IDC_INDEX_PARQUET_FILEPATH", None)
    return None if path is None else str(path)


def sibling(location: str, name: str) -> str:
    """The file `name` beside `location` (a path or a URL)."""
    if "://" in location:
        return urllib.parse.urljoin(location, name)
    return str(Path(location).with_name(name))


def load(location: str | None = None) -> IdcCatalog:
    """The catalog whose idc_index.parquet is at `location` (path or URL; a directory
    holds both files), by default the installed idc-index-data's."""
    location = location or default_location()
    if location is None:
        raise CatalogError("no IDC catalog: give one (--idc-catalog) or install "
                           "idc-index-data")
    if "://" not in location and Path(location).is_dir():
        location = str(Path(location) / INDEX)
    elif location.endswith("/"):
        location += INDEX
    try:
        import pyarrow.parquet as pq  # the idc extra
    except ImportError as exc:
        raise CatalogError(NEEDS_PYARROW) from exc
    index = _read(pq, location, INDEX_COLUMNS, optional=False)
    assert index is not None
    collections = _read(pq, sibling(location, COLLECTIONS), COLLECTION_COLUMNS, optional=True)
    return build(index.to_pylist(), [] if collections is None else collections.to_pylist(),
                 _version(index))


def _read(pq: Any, location: str, columns: tuple[str, ...], *, optional: bool) -> Any:
    try:
        source: Any = location
        if "://" in location:
            response = httpx.get(location, timeout=60, follow_redirects=True)
            if response.status_code == 404 and optional:
                return None
            response.raise_for_status()
            source = io.BytesIO(response.content)
        elif optional and not Path(location).exists():
            return None
        present = set(pq.read_schema(source).names)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return pq.read_table(source, columns=[c for c in columns if c in present])
    except (OSError, httpx.HTTPError, ValueError) as exc:
        raise CatalogError(f"cannot read the IDC catalog {location}: {exc}") from exc


def _version(table: Any) -> str | None:
    meta = table.schema.metadata or {}
    raw = meta.get(b"idc_index_data_version")
    return raw.decode() if raw else None


def _facts(row: dict[str, Any]) -> CollectionFacts:
    """The collection's own facts: those of its original data, not of analyses."""
    sources = row.get("sources") or []
    original = next((s for s in sources if s.get("source_type") == "original_data"),
                    sources[0] if sources else {})
    licence = original.get("license") or {}
    doi = original.get("source_doi")
    return CollectionFacts(
        license_name=licence.get("license_long_name") or licence.get("license_short_name"),
        license_uri=licence.get("license_url"),
        doi=f"https://doi.org/{doi}" if doi and "://" not in doi else doi,
        archive="NCI Imaging Data Commons (IDC)", archive_citation=original.get("citation"))


def build(index_rows: list[dict[str, Any]], collection_rows: list[dict[str, Any]],
          version: str | None = None) -> IdcCatalog:
    """The lookups from the rows of both files."""
    catalog = IdcCatalog(version=version)
    names = {r["collection_id"]: r["collection_name"] for r in collection_rows}
    for row in collection_rows:
        catalog.facts[row["collection_name"]] = _facts(row)
    for row in index_rows:
        _add_series(catalog, names.get(row["collection_id"], row["collection_id"]), row)
    return catalog


def _add_series(catalog: IdcCatalog, collection: str, row: dict[str, Any]) -> None:
    patient_id, study_uid = row["PatientID"], row["StudyInstanceUID"]
    catalog.collections.setdefault(collection, Collection(collection))
    catalog.patients.setdefault(collection, {}).setdefault(
        patient_id, Patient(collection, patient_id))
    studies = catalog.studies.setdefault((collection, patient_id), {})
    study = studies.get(study_uid)
    study = Study(collection, patient_id, study_uid,
                  study_date=_date(row.get("StudyDate")),
                  study_description=row.get("StudyDescription"),
                  series_count=1 + (study.series_count or 0 if study else 0))
    studies[study_uid] = study
    facts = catalog.facts.get(collection, CollectionFacts())
    doi = row.get("source_DOI")
    series = Series(
        collection, patient_id, study_uid, row["SeriesInstanceUID"],
        modality=row.get("Modality"), series_description=row.get("SeriesDescription"),
        series_number=_number(row.get("SeriesNumber")),
        body_part=row.get("BodyPartExamined"), image_count=row.get("instanceCount"),
        file_size=None if row.get("series_size_MB") is None
        else round(row["series_size_MB"] * 1e6),
        manufacturer=row.get("Manufacturer"), study_date=study.study_date,
        study_description=study.study_description,
        license_name=row.get("license_short_name") or facts.license_name,
        license_uri=facts.license_uri,
        data_description_uri=f"https://doi.org/{doi}" if doi else facts.doi,
        third_party_analysis="YES" if row.get("analysis_result_id") else None)
    catalog.series.setdefault(study_uid, []).append(series)
    catalog.by_uid[series.series_uid] = series
    catalog.places[series.series_uid] = SeriesPlace(row["aws_bucket"], row["crdc_series_uuid"])


def _number(text: Any) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _date(text: Any) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(str(text)[:10]) if text else None
    except ValueError:
        return None
