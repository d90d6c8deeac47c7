"""Header values -> records: the only place the archive's metadata is derived.

Every archive (files on disk, or made on demand) turns DICOM header values, read back
from a file or the exact values the encoder writes, plus the collection facts, into the
records the HTTP layer serves, through these functions alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tciafs.emulator.model import (
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.uids import seed_of

Getter = Callable[[str], str | None]


def dataset_getter(ds: Dataset) -> Getter:
    """Header values of a pydicom Dataset as the strings written in the file."""
    def get(keyword: str) -> str | None:
        value = ds.get(keyword)
        if isinstance(value, MultiValue | list):
            value = "\\".join(str(v) for v in value)
        return str(value) if value is not None and str(value) != "" else None
    return get


def values_getter(values: Mapping[str, str | int | None]) -> Getter:
    """The values the encoder writes into a header, read the same way as a Dataset."""
    def get(keyword: str) -> str | None:
        value = values.get(keyword)
        text = str(value) if value is not None else ""
        return text or None
    return get


def _date(text: str | None) -> dt.date | None:
    if not text:
        return None
    if len(text) == 8 and text.isascii() and text.isdigit():
        # What strptime("%Y%m%d") reads of eight digits, for a fraction of its cost
        # (listing NLST's 26,410 patients parses as many dates).
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    return dt.datetime.strptime(text, "%Y%m%d").date()


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
class Records:
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
