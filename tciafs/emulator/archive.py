"""The archives the emulator serves, and `load_archive` to get one by profile name.

Two implementations of the `Archive` protocol share one listing core:
- `DiskArchive`: the files were generated once into a data dir; a JSON index built by
  reading their headers back makes later starts take milliseconds.
- `GeneratedArchive`: nothing on disk; every file is made on demand from the seed. Sizes
  are computed without drawing pixels, MD5s when a series is first materialised.

In both, every record is derived by the same functions from DICOM header values (read
back from the files, or the exact values the encoder writes) plus the collection facts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pydicom
from cachetools import LRUCache
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tciafs.emulator.dicomgen import GENERATOR_VERSION, SeriesPlan, plan_patient, seed_of
from tciafs.emulator.model import (
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.profiles import Profile, get_profile

INDEX_NAME = "index.json"
INDEX_FORMAT = 1

Getter = Callable[[str], str | None]


# ---------------------------------------------------------------------------------------
# Header values -> records (the only place metadata is derived)


def dataset_getter(ds: Dataset) -> Getter:
    """Header values of a pydicom Dataset as the strings written in the file."""
    def get(keyword: str) -> str | None:
        value = ds.get(keyword)
        if isinstance(value, MultiValue | list):
            value = "\\".join(str(v) for v in value)
        return str(value) if value is not None and str(value) != "" else None
    return get


def values_getter(values: dict[str, str | int]) -> Getter:
    """The values the encoder writes into a header, read the same way as a Dataset."""
    def get(keyword: str) -> str | None:
        value = values.get(keyword)
        return str(value) if value is not None and str(value) != "" else None
    return get


def _date(text: str | None) -> dt.date | None:
    return dt.datetime.strptime(text, "%Y%m%d").date() if text else None


def _int(text: str | None) -> int | None:
    return int(float(text)) if text else None


def _required(get: Getter, keyword: str) -> str:
    value = get(keyword)
    if value is None:
        raise ValueError(f"header lacks {keyword}")
    return value


def patient_record(collection: str, get: Getter) -> PatientRecord:
    return PatientRecord(
        collection=collection, patient_id=_required(get, "PatientID"),
        patient_name=get("PatientName"), patient_birth_date=_date(get("PatientBirthDate")),
        patient_sex=get("PatientSex"), ethnic_group=get("EthnicGroup"))


def study_record(collection: str, get: Getter) -> StudyRecord:
    return StudyRecord(
        collection=collection, patient_id=_required(get, "PatientID"),
        study_instance_uid=_required(get, "StudyInstanceUID"),
        study_date=_date(get("StudyDate")), study_description=get("StudyDescription"),
        study_id=get("StudyID"), patient_age=get("PatientAge"),
        admitting_diagnoses_description=get("AdmittingDiagnosesDescription"))


def submission_time(facts: CollectionFacts, series_uid: str) -> dt.datetime:
    """When the series was submitted: some hours into the fortnight before release."""
    start = dt.datetime.combine(facts.date_released - dt.timedelta(days=14), dt.time())
    return start + dt.timedelta(seconds=seed_of(series_uid) % (13 * 86400))


def series_record(facts: CollectionFacts, get: Getter, image_count: int,
                  file_size: int) -> SeriesRecord:
    spacing = get("PixelSpacing")
    uid = _required(get, "SeriesInstanceUID")
    return SeriesRecord(
        collection=facts.name, patient_id=_required(get, "PatientID"),
        study_instance_uid=_required(get, "StudyInstanceUID"), series_instance_uid=uid,
        modality=_required(get, "Modality"), protocol_name=get("ProtocolName"),
        series_date=_date(get("SeriesDate")), series_description=get("SeriesDescription"),
        body_part_examined=get("BodyPartExamined"), series_number=_int(get("SeriesNumber")),
        manufacturer=get("Manufacturer"), manufacturer_model_name=get("ManufacturerModelName"),
        software_versions=get("SoftwareVersions"),
        pixel_spacing_row=spacing.split("\\")[0] if spacing else None,
        slice_thickness=get("SliceThickness"), image_count=image_count, file_size=file_size,
        max_submission_timestamp=submission_time(facts, uid))


def instance_record(get: Getter, size: int, md5: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=_required(get, "SOPInstanceUID"),
        sop_class_uid=_required(get, "SOPClassUID"),
        instance_number=_int(get("InstanceNumber")),
        acquisition_number=_int(get("AcquisitionNumber")), size=size, md5=md5)


@dataclass
class _Records:
    """Patients, studies and series in first-seen order, each patient and study once."""

    patients: list[PatientRecord] = field(default_factory=list)
    studies: list[StudyRecord] = field(default_factory=list)
    series: list[SeriesRecord] = field(default_factory=list)
    _seen: set[tuple[str, ...]] = field(default_factory=set)

    def add(self, facts: CollectionFacts, first: Getter, image_count: int,
            file_size: int) -> SeriesRecord:
        patient = patient_record(facts.name, first)
        if ("p", patient.collection, patient.patient_id) not in self._seen:
            self._seen.add(("p", patient.collection, patient.patient_id))
            self.patients.append(patient)
        study = study_record(facts.name, first)
        if ("s", study.study_instance_uid) not in self._seen:
            self._seen.add(("s", study.study_instance_uid))
            self.studies.append(study)
        record = series_record(facts, first, image_count, file_size)
        self.series.append(record)
        return record


# ---------------------------------------------------------------------------------------
# Listing (shared by both archives)


def _upper(text: str | None) -> str | None:
    return None if text is None else text.upper()


class _ListingArchive:
    """Filters as NBIA does: case-insensitive on collection and patient, exact on UIDs."""

    def __init__(self, profile: Profile, records: _Records) -> None:
        self.profile = profile
        self.collections: dict[str, CollectionFacts] = {
            c.facts.name: c.facts for c in profile.collections}
        self._patients = records.patients
        self._studies = records.studies
        self._series = records.series
        self._series_by_uid = {s.series_instance_uid: s for s in records.series}

    @staticmethod
    def _match(rows: Iterable[Any], collection: str | None, patient_id: str | None) -> list:
        c, p = _upper(collection), _upper(patient_id)
        return [r for r in rows
                if (c is None or r.collection.upper() == c)
                and (p is None or r.patient_id.upper() == p)]

    def patients(self, collection: str | None = None) -> list[PatientRecord]:
        return self._match(self._patients, collection, None)

    def studies(self, collection: str | None = None, patient_id: str | None = None
                ) -> list[StudyRecord]:
        return self._match(self._studies, collection, patient_id)

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_instance_uid: str | None = None) -> list[SeriesRecord]:
        rows = self._match(self._series, collection, patient_id)
        if study_instance_uid is not None:
            rows = [s for s in rows if s.study_instance_uid == study_instance_uid]
        return rows

    def series_by_uid(self, series_instance_uid: str) -> SeriesRecord | None:
        return self._series_by_uid.get(series_instance_uid)


def _slices(data: bytes, chunk_size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield bytes(view[start:start + chunk_size])


# ---------------------------------------------------------------------------------------
# On demand (scale, bench)


def _sop_prefix(sop_instance_uid: str) -> str:
    """A generated SOP UID less its last component, the instance number."""
    return sop_instance_uid.rpartition(".")[0]


@dataclass(frozen=True)
class _Materialised:
    records: list[InstanceRecord]


class GeneratedArchive(_ListingArchive):
    """Every file made from the seed when asked for; nothing written to disk.

    Listing patients, studies and series never draws a pixel (`planes_drawn` counts the
    pixel planes drawn, so tests can prove it); listing a series' instances does, as
    their records carry each file's MD5. Drawn planes and instance records of recent
    series stay in bounded LRU caches.
    """

    def __init__(self, profile: Profile, *, payload_cache_bytes: int = 256 << 20,
                 instance_cache_records: int = 200_000) -> None:
        records = _Records()
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
        super().__init__(profile, records)
        self._lock = threading.Lock()
        self._payloads: LRUCache[tuple[str, int], bytes] = LRUCache(
            maxsize=payload_cache_bytes, getsizeof=len)
        self._instances: LRUCache[str, _Materialised] = LRUCache(
            maxsize=instance_cache_records, getsizeof=lambda m: max(1, len(m.records)))
        self.planes_drawn = 0

    def plan(self, series_instance_uid: str) -> SeriesPlan | None:
        return self._plans.get(series_instance_uid)

    def _payload(self, plan: SeriesPlan, i: int) -> bytes:
        if not plan.payload_size:
            return b""
        key = (plan.series_uid, plan.plane_index(i))
        with self._lock:
            cached = self._payloads.get(key)
        if cached is not None:
            return cached
        payload = plan.render_payload(i)
        with self._lock:
            self.planes_drawn += plan.frames
            if len(payload) <= self._payloads.maxsize:
                self._payloads[key] = payload
        return payload

    def _materialise(self, plan: SeriesPlan) -> _Materialised:
        records = []
        for i in range(plan.count):
            header, payload = plan.header(i), self._payload(plan, i)
            size = len(header) + len(payload)
            if size != plan.size(i):  # the listing promised plan.size(i); never lie
                raise AssertionError(f"size mismatch in {plan.series_uid} instance {i}")
            md5 = hashlib.md5(header)
            md5.update(payload)
            records.append(instance_record(values_getter(plan.header_values(i)), size,
                                           md5.hexdigest()))
        return _Materialised(records)

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        plan = self._plans.get(series_instance_uid)
        if plan is None:
            return []
        with self._lock:
            done = self._instances.get(series_instance_uid)
        if done is None:
            done = self._materialise(plan)
            with self._lock:
                self._instances[series_instance_uid] = done
        return list(done.records)

    def _locate(self, series_uid: str, sop_uid: str) -> tuple[SeriesPlan, int] | None:
        plan = self._plans.get(series_uid)
        i = plan.index_of(sop_uid) if plan else None
        return None if plan is None or i is None else (plan, i)

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        uid = self._by_sop_prefix.get(_sop_prefix(sop_instance_uid))
        return uid if uid is not None and self._locate(uid, sop_instance_uid) else None

    def instance_bytes(self, series_instance_uid: str, sop_instance_uid: str) -> bytes | None:
        found = self._locate(series_instance_uid, sop_instance_uid)
        if found is None:
            return None
        plan, i = found
        return plan.header(i) + self._payload(plan, i)

    def iter_instance_chunks(self, series_instance_uid: str, sop_instance_uid: str,
                             chunk_size: int = 65536) -> Iterator[bytes]:
        found = self._locate(series_instance_uid, sop_instance_uid)
        if found is None:
            return
        plan, i = found
        yield from _slices(plan.header(i), chunk_size)
        yield from _slices(self._payload(plan, i), chunk_size)

    def dicom_tags(self, series_instance_uid: str) -> Dataset | None:
        plan = self._plans.get(series_instance_uid)
        if plan is None:
            return None
        # The header alone ends at the Pixel Data element: nothing to draw.
        return pydicom.dcmread(io.BytesIO(plan.header(0)), stop_before_pixels=True)


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
                  records: _Records) -> dict[str, Any]:
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
    records, layout = _Records(), []
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
        records = _Records(
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
                 ) -> DiskArchive | GeneratedArchive:
    """The archive of a named profile ("demo", "scale", "bench") or of a Profile.

    On-disk profiles are generated into `data_dir` (default: the user cache) the first
    time and loaded from their index afterwards; the others ignore `data_dir`.
    """
    spec = get_profile(profile) if isinstance(profile, str) else profile
    if not spec.on_disk:
        return GeneratedArchive(spec)
    root = ensure_on_disk(spec, Path(data_dir) if data_dir else default_data_dir())
    return DiskArchive(spec, root)

