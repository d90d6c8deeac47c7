"""The archives the emulator serves, and `load_archive` to get one by profile name.

Two implementations of the `Archive` protocol share one listing core:
- `DiskArchive`: the files were generated once into a data dir; a JSON index built by
  reading their headers back makes later starts take milliseconds.
- `GeneratedArchive`: nothing on disk; every file is made on demand from the seed. Sizes
  are computed without drawing pixels, MD5s when a series is first materialised.

In both, every record is derived by the same functions (`records.py`) from DICOM header
values (read back from the files, or the exact values the encoder writes) plus the
collection facts. A profile too large to plan whole (nlst) gets a third archive,
`PatientwiseArchive` (`patientwise.py`), which plans one patient at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from tciafs.emulator.dicomgen import GENERATOR_VERSION, SeriesPlan, plan_patient
from tciafs.emulator.model import (
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.ondemand import OnDemandSeries
from tciafs.emulator.patientwise import PatientwiseArchive
from tciafs.emulator.profiles import Profile, get_profile
from tciafs.emulator.records import Records, dataset_getter, instance_record, values_getter

INDEX_NAME = "index.json"
INDEX_FORMAT = 1


# ---------------------------------------------------------------------------------------
# Listing (shared by both archives)


def _upper(text: str | None) -> str | None:
    return None if text is None else text.upper()


def _by_patient(rows: Iterable[Any]) -> dict[tuple[str, str], list[Any]]:
    out: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in rows:
        out[(r.collection.upper(), r.patient_id.upper())].append(r)
    return out


class _ListingArchive:
    """Filters as NBIA does: case-insensitive on collection and patient, exact on UIDs."""

    def __init__(self, profile: Profile, records: Records) -> None:
        self.profile = profile
        self.collections: dict[str, CollectionFacts] = {
            c.facts.name: c.facts for c in profile.collections}
        self._patients = records.patients
        self._studies = records.studies
        self._series = records.series
        self._series_by_uid = {s.series_instance_uid: s for s in records.series}
        # A series listing looks up its patient and studies once a patient: by index,
        # not by a scan of the whole archive each time.
        self._patient_rows = {"patients": _by_patient(self._patients),
                              "studies": _by_patient(self._studies),
                              "series": _by_patient(self._series)}

    @staticmethod
    def _match(rows: Iterable[Any], collection: str | None, patient_id: str | None) -> list:
        c, p = _upper(collection), _upper(patient_id)
        return [r for r in rows
                if (c is None or r.collection.upper() == c)
                and (p is None or r.patient_id.upper() == p)]

    def _select(self, kind: str, rows: list[Any], collection: str | None,
                patient_id: str | None) -> list:
        if collection is not None and patient_id is not None:
            return list(self._patient_rows[kind].get((collection.upper(), patient_id.upper()),
                                                     ()))
        return self._match(rows, collection, patient_id)

    def patients(self, collection: str | None = None, patient_id: str | None = None
                 ) -> list[PatientRecord]:
        return self._select("patients", self._patients, collection, patient_id)

    def studies(self, collection: str | None = None, patient_id: str | None = None
                ) -> list[StudyRecord]:
        return self._select("studies", self._studies, collection, patient_id)

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_instance_uid: str | None = None) -> list[SeriesRecord]:
        rows = self._select("series", self._series, collection, patient_id)
        if study_instance_uid is not None:
            rows = [s for s in rows if s.study_instance_uid == study_instance_uid]
        return rows

    def series_by_uid(self, series_instance_uid: str) -> SeriesRecord | None:
        return self._series_by_uid.get(series_instance_uid)


# ---------------------------------------------------------------------------------------
# On demand (scale, bench)


def _sop_prefix(sop_instance_uid: str) -> str:
    """A generated SOP UID less its last component, the instance number."""
    return sop_instance_uid.rpartition(".")[0]


class GeneratedArchive(_ListingArchive, OnDemandSeries):
    """Every series planned at start from the seed, every file made when asked for.

    Listing patients, studies and series never draws a pixel (`OnDemandSeries`).
    """

    def __init__(self, profile: Profile, *, payload_cache_bytes: int = 256 << 20,
                 instance_cache_records: int = 200_000) -> None:
        records = Records()
        self._plans: dict[str, SeriesPlan] = {}
        # A series' SOP UIDs share one prefix: the way from an image to its series.
        self._by_sop_prefix: dict[str, str] = {}
        for cspec in profile.collections:
            for patient in cspec.patients:
                for plan in plan_patient(profile.seed, cspec.facts.name, patient):
                    self._plans[plan.series_uid] = plan
                    self._by_sop_prefix[_sop_prefix(plan.sop_uid(0))] = plan.series_uid
                    records.add(cspec.facts, values_getter(plan.header_values(0)),
                                plan.count, plan.file_size())
        _ListingArchive.__init__(self, profile, records)
        OnDemandSeries.__init__(self, payload_cache_bytes=payload_cache_bytes,
                                instance_cache_records=instance_cache_records)

    def plan(self, series_instance_uid: str) -> SeriesPlan | None:
        return self._plans.get(series_instance_uid)

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        uid = self._by_sop_prefix.get(_sop_prefix(sop_instance_uid))
        return uid if uid is not None and self._locate(uid, sop_instance_uid) else None


# ---------------------------------------------------------------------------------------
# On disk (demo)


def _to_json(record: Any) -> dict[str, Any]:
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        out[f.name] = value.isoformat() if isinstance(value, dt.date) else value
    return out


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        value = data.get(f.name)
        if isinstance(value, str) and "dt.datetime" in str(f.type):
            value = dt.datetime.fromisoformat(value)
        elif isinstance(value, str) and "dt.date" in str(f.type):
            value = dt.date.fromisoformat(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _write_series(root: Path, facts: CollectionFacts, plan: SeriesPlan,
                  records: Records) -> dict[str, Any]:
    """Write a series' files, then derive its records by reading them back."""
    folder = root / plan.series_uid
    folder.mkdir()
    names = [f"{i + 1:04d}.dcm" for i in range(plan.count)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(plan.file_bytes(i))
    instances: list[dict[str, Any]] = []
    first = None
    for name in names:
        data = (folder / name).read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        first = first or ds
        record = instance_record(dataset_getter(ds), len(data), hashlib.md5(data).hexdigest())
        instances.append({"file": name, "record": _to_json(record)})
    assert first is not None
    total = sum(item["record"]["size"] for item in instances)
    series = records.add(facts, dataset_getter(first), len(instances), total)
    return {"uid": series.series_instance_uid, "instances": instances}


def generate_to_disk(profile: Profile, root: Path) -> None:
    """Write every file of `profile` under `root` (which must exist), index last."""
    records, layout = Records(), []
    for cspec in profile.collections:
        for patient in cspec.patients:
            for plan in plan_patient(profile.seed, cspec.facts.name, patient):
                layout.append(_write_series(root, cspec.facts, plan, records))
    index = {
        "format": INDEX_FORMAT, "profile": profile.name, "fingerprint": fingerprint(profile),
        "patients": [_to_json(p) for p in records.patients],
        "studies": [_to_json(s) for s in records.studies],
        "series": [_to_json(s) for s in records.series],
        "files": layout,
    }
    (root / INDEX_NAME).write_text(json.dumps(index, ensure_ascii=False, indent=0),
                                   encoding="utf-8")


def fingerprint(profile: Profile) -> str:
    """Changes whenever the profile or the generator would produce different files."""
    text = f"{GENERATOR_VERSION}|{INDEX_FORMAT}|{profile!r}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned(data_dir: Path, name: str) -> None:
    """Delete temp dirs left by generators that died (their pid is in the name)."""
    for tmp in data_dir.glob(f".{name}-tmp-*"):
        pid = tmp.name.split("-tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_on_disk(profile: Profile, data_dir: Path) -> Path:
    """The complete generated tree of `profile` in `data_dir`, generating it if needed.

    A tree becomes visible only by an atomic rename of a finished temp dir, so a crash or
    a concurrent generator never leaves a half-written archive that looks complete.
    """
    final = data_dir / f"{profile.name}-{fingerprint(profile)}"
    if (final / INDEX_NAME).is_file():
        return final
    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(data_dir, profile.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{profile.name}-tmp-{os.getpid()}-", dir=data_dir))
    try:
        generate_to_disk(profile, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / INDEX_NAME).is_file():  # not a lost race: a real failure
            raise
    return final


class DiskArchive(_ListingArchive):
    """Files generated once into a directory, listed from its JSON index."""

    def __init__(self, profile: Profile, root: Path) -> None:
        index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{root}: index format {index.get('format')!r} unsupported")
        records = Records(
            patients=[_from_json(PatientRecord, p) for p in index["patients"]],
            studies=[_from_json(StudyRecord, s) for s in index["studies"]],
            series=[_from_json(SeriesRecord, s) for s in index["series"]])
        super().__init__(profile, records)
        self.root = root
        self._instances: dict[str, list[InstanceRecord]] = {}
        self._files: dict[str, dict[str, Path]] = {}
        for entry in index["files"]:
            uid = entry["uid"]
            self._instances[uid] = [_from_json(InstanceRecord, item["record"])
                                    for item in entry["instances"]]
            self._files[uid] = {item["record"]["sop_instance_uid"]: root / uid / item["file"]
                                for item in entry["instances"]}
        self._series_of_sop = {sop: uid for uid, files in self._files.items()
                               for sop in files}

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        return list(self._instances.get(series_instance_uid, ()))

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        return self._series_of_sop.get(sop_instance_uid)

    def path(self, series_instance_uid: str, sop_instance_uid: str) -> Path | None:
        return self._files.get(series_instance_uid, {}).get(sop_instance_uid)

    def instance_bytes(self, series_instance_uid: str, sop_instance_uid: str) -> bytes | None:
        path = self.path(series_instance_uid, sop_instance_uid)
        return path.read_bytes() if path else None

    def iter_instance_chunks(self, series_instance_uid: str, sop_instance_uid: str,
                             chunk_size: int = 65536) -> Iterator[bytes]:
        path = self.path(series_instance_uid, sop_instance_uid)
        if path is None:
            return
        with path.open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def dicom_tags(self, series_instance_uid: str) -> Dataset | None:
        records = self._instances.get(series_instance_uid)
        if not records:
            return None
        path = self.path(series_instance_uid, records[0].sop_instance_uid)
        assert path is not None
        return pydicom.dcmread(path, stop_before_pixels=True)


# ---------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tciafs" / "emulator"


def load_archive(profile: str | Profile, data_dir: Path | None = None
                 ) -> DiskArchive | GeneratedArchive | PatientwiseArchive:
    """The archive of a named profile ("demo", "scale", "bench", "nlst") or of a Profile.

    On-disk profiles are generated into `data_dir` (default: the user cache) the first
    time and loaded from their index afterwards; the others ignore `data_dir`. A profile
    with drawn collections (nlst) holds nothing else.
    """
    spec = get_profile(profile) if isinstance(profile, str) else profile
    if spec.drawn:
        return PatientwiseArchive(spec)
    if not spec.on_disk:
        return GeneratedArchive(spec)
    root = ensure_on_disk(spec, Path(data_dir) if data_dir else default_data_dir())
    return DiskArchive(spec, root)

