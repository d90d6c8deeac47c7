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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tciafs.sources.base import CollectionFacts, Patient, Series, Study

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


Range = tuple[int, int]  # rows start to stop-1 of the sorted index


class IdcCatalog:
    """The catalog by level; collections are named as TCIA spells them.

    The real index has a million series: records are made only for the level asked
    for. The index stays a column table sorted by collection, patient and study, and
    each patient and study is a range of its rows.
    """

    def __init__(self, table: Any, names: dict[str, str],
                 facts: dict[str, CollectionFacts], version: str | None = None) -> None:
        import pyarrow as pa  # the idc extra; load() has checked it is there

        collection = [names.get(c, c) for c in table.column("collection_id").to_pylist()]
        table = table.append_column("collection", pa.array(collection, pa.string()))
        self._table = table.sort_by([("collection", "ascending"), ("PatientID", "ascending"),
                                     ("StudyInstanceUID", "ascending")])
        self.facts = facts
        self.version = version  # idc_index_data_version in the files' metadata
        self._patients: dict[str, dict[str, Range]] = {}
        self._studies: dict[tuple[str, str], dict[str, Range]] = {}
        self._places: dict[str, SeriesPlace] = {}  # by series UID, as series are made
        self._index_levels()

    def _index_levels(self) -> None:
        keys = zip(self._table.column("collection").to_pylist(),
                   self._table.column("PatientID").to_pylist(),
                   self._table.column("StudyInstanceUID").to_pylist(), strict=True)
        for row, (collection, patient, study) in enumerate(keys):
            _extend(self._patients.setdefault(collection, {}), patient, row)
            _extend(self._studies.setdefault((collection, patient), {}), study, row)

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def collection_names(self) -> list[str]:
        return sorted(self._patients)

    def patients_of(self, collection: str) -> list[Patient]:
        return [Patient(collection, p) for p in self._patients.get(collection, {})]

    def studies_of(self, collection: str, patient_id: str | None) -> list[Study]:
        found = []
        for (patient, uid), (start, stop) in self._study_ranges(collection, patient_id):
            row = self._rows(start, start + 1)[0]
            found.append(Study(collection, patient, uid, study_date=_date(row.get("StudyDate")),
                               study_description=row.get("StudyDescription"),
                               series_count=stop - start))
        return found

    def series_of(self, collection: str, patient_id: str | None) -> list[Series]:
        return [self._series(row) for _key, (start, stop)
                in self._study_ranges(collection, patient_id)
                for row in self._rows(start, stop)]

    def series_by_uid(self, series_uid: str) -> Series | None:
        import pyarrow.compute as pc

        row = pc.index(self._table.column("SeriesInstanceUID"), series_uid).as_py()
        return None if row < 0 else self._series(self._rows(row, row + 1)[0])

    def place(self, series_uid: str) -> SeriesPlace | None:
        """Where the series' objects are; from a series record made earlier, or looked up."""
        if series_uid not in self._places and self.series_by_uid(series_uid) is None:
            return None
        return self._places[series_uid]

    def _study_ranges(self, collection: str, patient_id: str | None
                      ) -> list[tuple[tuple[str, str], Range]]:
        patients = [patient_id] if patient_id is not None \
            else list(self._patients.get(collection, {}))
        return [((p, uid), rows) for p in patients
                for uid, rows in self._studies.get((collection, p), {}).items()]

    def _rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._table.slice(start, stop - start).to_pylist()
        return rows

    def _series(self, row: dict[str, Any]) -> Series:
        collection = row["collection"]
        facts = self.facts.get(collection, CollectionFacts())
        doi = row.get("source_DOI")
        series = Series(
            collection, row["PatientID"], row["StudyInstanceUID"], row["SeriesInstanceUID"],
            modality=row.get("Modality"), series_description=row.get("SeriesDescription"),
            series_number=_number(row.get("SeriesNumber")),
            body_part=row.get("BodyPartExamined"), image_count=row.get("instanceCount"),
            file_size=None if row.get("series_size_MB") is None
            else round(row["series_size_MB"] * 1e6),
            manufacturer=row.get("Manufacturer"), study_date=_date(row.get("StudyDate")),
            study_description=row.get("StudyDescription"),
            license_name=row.get("license_short_name") or facts.license_name,
            license_uri=facts.license_uri,
            data_description_uri=f"https://doi.org/{doi}" if doi else facts.doi,
            third_party_analysis="YES" if row.get("analysis_result_id") else None)
        self._places[series.series_uid] = SeriesPlace(row["aws_bucket"],
                                                      row["crdc_series_uuid"])
        return series


def _extend(ranges: dict[str, Range], key: str, row: int) -> None:
    """Grow the range of `key` to take `row` in (rows of one key are adjacent)."""
    start = ranges.get(key, (row, row))[0]
    ranges[key] = (start, row + 1)


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
    rows = [] if collections is None else collections.to_pylist()
    return IdcCatalog(index, {r["collection_id"]: r["collection_name"] for r in rows},
                      {r["collection_name"]: _facts(r) for r in rows}, _version(index))


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
