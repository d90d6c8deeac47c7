"""The emulator's archive model: what exists, as the NBIA database would hold it.

Every field below that describes an image, series, study or patient is read from
the DICOM headers the generator wrote; only the collection facts (license, DOI,
release date, access) are typed by hand, in the profile.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CollectionFacts:
    name: str
    license_name: str  # "Creative Commons Attribution 4.0 International License"
    license_short: str  # "CC BY 4.0", used in the ZIP LICENSE text
    license_uri: str
    doi: str  # "https://doi.org/10.7937/..."
    date_released: dt.date
    site: str
    description: str
    restricted: bool = False  # visible only to users granted it (or "*")
    host: str = "main"  # "main" or "nlst": which server holds it


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    acquisition_number: int | None
    size: int  # exact bytes of the Part-10 file
    md5: str  # lowercase hex of the file


@dataclass(frozen=True)
class SeriesRecord:
    collection: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    protocol_name: str | None
    series_date: dt.date | None
    series_description: str | None
    body_part_examined: str | None
    series_number: int | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    software_versions: str | None
    pixel_spacing_row: str | None  # e.g. "0.703125"
    slice_thickness: str | None  # e.g. "1.250000"
    image_count: int
    file_size: int  # sum of instance sizes
    max_submission_timestamp: dt.datetime
    third_party_analysis: str | None = None  # "YES" or None
    annotations_flag: bool | None = None


@dataclass(frozen=True)
class StudyRecord:
    collection: str
    patient_id: str
    study_instance_uid: str
    study_date: dt.date | None
    study_description: str | None
    study_id: str | None
    patient_age: str | None  # DICOM AS, "065Y"
    admitting_diagnoses_description: str | None = None
    longitudinal_temporal_event_type: str | None = None
    longitudinal_temporal_offset_from_event: int | None = None


@dataclass(frozen=True)
class PatientRecord:
    collection: str
    patient_id: str
    patient_name: str | None
    patient_birth_date: dt.date | None
    patient_sex: str | None
    ethnic_group: str | None
    species_code: str | None = None  # None means the server fills "337915000"
    species_description: str | None = None
    phantom: str | None = None


class Archive(Protocol):
    """What the HTTP layer needs from an archive (demo files, on-demand scale, or nlst
    drawn patient by patient).

    Lists come back in a stable order; filters compare case-insensitively on
    collection and patient id, exactly on UIDs, as the NBIA database does.
    """

    collections: dict[str, CollectionFacts]

    def patients(self, collection: str | None = None, patient_id: str | None = None
                 ) -> list[PatientRecord]: ...

    def studies(self, collection: str | None = None, patient_id: str | None = None
                ) -> list[StudyRecord]: ...

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_instance_uid: str | None = None) -> list[SeriesRecord]: ...

    def series_by_uid(self, series_instance_uid: str) -> SeriesRecord | None: ...

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]: ...

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        """The UID of the series holding an image, or None (NBIA finds an image by its
        SOP Instance UID alone for getM5HashForImage)."""
        ...

    def instance_bytes(self, series_instance_uid: str, sop_instance_uid: str
                       ) -> bytes | None: ...

    def iter_instance_chunks(self, series_instance_uid: str, sop_instance_uid: str,
                             chunk_size: int = 65536) -> Iterator[bytes]: ...

    def dicom_tags(self, series_instance_uid: str) -> object | None:
        """The pydicom Dataset of the series' first image (for getDicomTags)."""
        ...
