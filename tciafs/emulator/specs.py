"""What a profile asks for: patients, their studies and series, and each kind's traits.

Plain descriptions, planned into `tciafs.emulator.dicomgen.SeriesPlan`s by the generator.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    CT = "CT"
    MR = "MR"
    PT = "PT"
    SC_MF = "SC-MF"  # Multi-frame Grayscale Word Secondary Capture
    RTSTRUCT = "RTSTRUCT"


@dataclass(frozen=True)
class KindTraits:
    sop_class_uid: str
    modality: str
    matrix: int  # default rows = columns
    fov_mm: float  # default field of view, so spacing follows the matrix
    thickness_mm: float
    image: bool = True


TRAITS: dict[Kind, KindTraits] = {
    Kind.CT: KindTraits("1.2.840.10008.5.1.4.1.1.2", "CT", 512, 360.0, 2.5),
    Kind.MR: KindTraits("1.2.840.10008.5.1.4.1.1.4", "MR", 256, 240.0, 4.0),
    Kind.PT: KindTraits("1.2.840.10008.5.1.4.1.1.128", "PT", 128, 520.0, 3.27),
    Kind.SC_MF: KindTraits("1.2.840.10008.5.1.4.1.1.7.3", "OT", 128, 240.0, 5.0),
    Kind.RTSTRUCT: KindTraits("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", 0, 0.0, 0.0,
                              image=False),
}


@dataclass(frozen=True)
class SeriesSpec:
    kind: Kind
    count: int  # files; for SC_MF the number of frames of its single file
    description: str | None
    protocol: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    software: str | None = None
    number: int | None = None  # SeriesNumber; defaults to the position in the study
    matrix: int | None = None  # rows = columns; default per kind
    thickness_mm: float | None = None
    references: int | None = None  # RTSTRUCT: index of the CT series it outlines
    # Distinct pixel planes drawn per series; slices reuse them cyclically. None draws
    # every slice on its own (demo); a few planes keep on-demand profiles fast.
    distinct_planes: int | None = None


@dataclass(frozen=True)
class StudySpec:
    date: dt.date
    description: str | None
    study_id: str | None
    series: tuple[SeriesSpec, ...]
    time: str = "093000"


@dataclass(frozen=True)
class PatientSpec:
    patient_id: str
    sex: str | None
    birth_date: dt.date | None
    studies: tuple[StudySpec, ...]
    ethnic_group: str | None = None
    name: str | None = None  # TCIA de-identification usually sets the name to the id
