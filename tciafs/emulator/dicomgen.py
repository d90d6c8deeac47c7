"""Deterministic DICOM Part-10 generator for the emulator's archives.

A series is described by a `SeriesPlan`: the header values it carries (patient, study,
series and per-instance strings) and how to draw its pixels. From a plan the generator
makes the exact bytes of any instance on demand, and the exact size of any instance
without drawing a single pixel. Everything is fixed by the profile seed: the same seed
gives byte-identical files on every run.

Why a hand-rolled encoder next to pydicom: constant elements (the per-kind "template",
including sequences) are encoded once by pydicom, but the dozen values that vary per
series or per instance are short-VR strings that we encode ourselves and splice in tag
order. That makes an instance header cost microseconds instead of a pydicom write, which
is what lets the scale and bench profiles serve hundreds of MB/s and compute sizes for
100,000 instances without generating them.

The parts live apart: UIDs and seeds (tciafs.emulator.uids), what a profile asks for
(specs), the element encoder and file meta (elements), the constant templates
(templates) and the phantoms the pixels are drawn from (phantoms). This module plans
series and makes their bytes.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from dataclasses import dataclass

import numpy as np

from tciafs.emulator.elements import (
    EXPLICIT_VR_LE,
    PIXEL_DATA_TAG,
    PREAMBLE,
    Head,
    decimal_string,
    encode_dataset_elements,
    encode_value,
    encode_with,
    encoded_length,
    file_meta,
    head_of,
    tag_vr,
)
from tciafs.emulator.phantoms import ct_plane, grid, mr_plane, pt_plane
from tciafs.emulator.specs import TRAITS, Kind, PatientSpec, SeriesSpec, StudySpec
from tciafs.emulator.templates import image_template, rtstruct_template
from tciafs.emulator.uids import UID_ROOT, UidMaker, make_uid, seed_of

# What other modules import from here, wherever it now lives.
__all__ = [
    "EXPLICIT_VR_LE", "GENERATOR_VERSION", "TRAITS", "UID_ROOT", "Kind",
    "PatientSpec", "SeriesPlan", "SeriesSpec", "StudySpec", "UidMaker", "make_uid",
    "patient_values", "plan_patient", "plan_series", "seed_of",
]

# Bump whenever the bytes produced for an unchanged profile change, so that a demo
# written by an older generator is regenerated instead of being mixed with new code.
GENERATOR_VERSION = 1


# ---------------------------------------------------------------------------------------
# Series plans


def _age(birth: dt.date | None, on: dt.date) -> str | None:
    if birth is None:
        return None
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _da(d: dt.date | None) -> str | None:
    return d.strftime("%Y%m%d") if d else None


@dataclass(eq=False)
class SeriesPlan:
    """Everything needed to produce the bytes of any instance of one series."""

    kind: Kind
    series_uid: str
    count: int  # files
    frames: int  # frames per file
    rows: int
    cols: int
    spacing: float
    thickness: float
    z0: float
    values: dict[str, str | int]  # series-level header values; None values left out
    pixel_seed: int
    distinct_planes: int
    reference: SeriesPlan | None = None  # the CT series an RTSTRUCT outlines
    # SOP Instance UIDs are this plus ".<instance number>"; "" derives it by `make_uid`.
    sop_prefix: str = ""

    def __post_init__(self) -> None:
        # 30 hashed digits leave room for ".<instance>" within 64 characters.
        if not self.sop_prefix:
            self.sop_prefix = make_uid(self.series_uid, "sop", digits=30)

    # -- identity and geometry ----------------------------------------------------------

    @property
    def sop_class_uid(self) -> str:
        return TRAITS[self.kind].sop_class_uid

    def sop_uid(self, i: int) -> str:
        return f"{self.sop_prefix}.{i + 1}"

    def index_of(self, sop_uid: str) -> int | None:
        """The instance index of a SOP Instance UID of this series, or None."""
        head, _, number = sop_uid.rpartition(".")
        if head != self.sop_prefix or not number.isdigit() or number.startswith("0"):
            return None
        i = int(number) - 1
        return i if i < self.count else None

    def z(self, i: int) -> float:
        return self.z0 + i * self.thickness

    @property
    def centre_z(self) -> float:
        """Where the phantom's organs are widest (and the nodule sits)."""
        positions = self.frames if self.kind is Kind.SC_MF else self.count
        return self.z0 + (positions - 1) * self.thickness / 2

    @property
    def origin_xy(self) -> tuple[float, float]:
        """Patient coordinates of the first pixel's centre: the image is centred on 0,0."""
        return -(self.cols - 1) / 2 * self.spacing, -(self.rows - 1) / 2 * self.spacing

    @functools.cached_property
    def _xy_text(self) -> str:
        """ImagePositionPatient up to its z, the same in every instance."""
        return _xy_text(*self.origin_xy)

    def instance_values(self, i: int) -> dict[str, str | int]:
        return _instance_values(self.kind, self.sop_prefix, i, self._xy_text, self.z(i))

    def header_values(self, i: int = 0) -> dict[str, str | int]:
        """Every value this instance's header carries that a profile chose (not the template)."""
        return {**self.values, **self.instance_values(i)}

    # -- sizes --------------------------------------------------------------------------

    @property
    def payload_size(self) -> int:
        return self.rows * self.cols * 2 * self.frames if TRAITS[self.kind].image else 0

    @functools.cached_property
    def _fixed_length(self) -> int:
        """Bytes of every instance that do not depend on the instance: all but its values."""
        template = sum(len(b) for _, b in self._template())
        series = sum(encoded_length(k, v) for k, v in self.values.items())
        meta = len(file_meta(self.sop_class_uid, ""))
        meta -= encoded_length("MediaStorageSOPInstanceUID", "")
        pixel_header = 12 if self.payload_size else 0
        return len(PREAMBLE) + meta + template + series + pixel_header

    def size(self, i: int) -> int:
        """Exact file size of instance i, computed without drawing pixels."""
        return self._fixed_length + _varying_length(self.instance_values(i)) + self.payload_size

    def file_size(self) -> int:
        """Sum of the instance sizes; memoised across series of the same geometry."""
        varying = _varying_total(self.kind, self.count, len(self.sop_prefix),
                                 *self.origin_xy, self.z0, self.thickness)
        return self.count * (self._fixed_length + self.payload_size) + varying

    # -- bytes --------------------------------------------------------------------------

    @functools.cached_property
    def _segments(self) -> tuple[bytes | str, ...]:
        """The dataset in tag order: constant runs as bytes, per-instance slots as keywords."""
        parts: list[tuple[int, bytes | str]] = list(self._template())
        parts += [(tag_vr(k)[0], encode_value(k, v)) for k, v in self.values.items()]
        parts += [(tag_vr(k)[0], k) for k in self.instance_values(0)]
        parts.sort(key=lambda p: p[0])
        tags = [t for t, _ in parts]
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate elements in plan for {self.series_uid}")
        merged: list[bytes | str] = []
        for _, part in parts:
            if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += part
            else:
                merged.append(part)
        return tuple(merged)

    @functools.cached_property
    def _slots(self) -> tuple[bytes | tuple[str, Head], ...]:
        """`_segments` with each slot's keyword and its `Head`, looked up once a series."""
        return tuple(s if isinstance(s, bytes) else (s, head_of(s)) for s in self._segments)

    def _template(self) -> tuple[tuple[int, bytes], ...]:
        if self.kind is Kind.RTSTRUCT:
            return tuple(encode_dataset_elements(rtstruct_template(self)))
        return image_template(self.kind, self.rows, self.cols)

    @functools.cached_property
    def _pixel_data_head(self) -> bytes:
        if not self.payload_size:
            return b""
        # Pixel Data is long-VR: tag, "OW", two reserved bytes, 32-bit length.
        return struct.pack("<HH2s2xI", PIXEL_DATA_TAG >> 16, PIXEL_DATA_TAG & 0xFFFF,
                           b"OW", self.payload_size)

    def header(self, i: int, vals: dict[str, str | int] | None = None) -> bytes:
        """The file up to and including the Pixel Data element header (all of it for RT);
        `vals` are `instance_values(i)` where the caller has them already."""
        vals = vals if vals is not None else self.instance_values(i)
        # Listing a series makes every header (their MD5s order the listing): keep the
        # loop plain, it runs once an instance.
        parts = [PREAMBLE, file_meta(self.sop_class_uid, str(vals["SOPInstanceUID"]))]
        for segment in self._slots:
            parts.append(segment if isinstance(segment, bytes)
                         else encode_with(segment[1], vals[segment[0]]))
        parts.append(self._pixel_data_head)
        return b"".join(parts)

    def plane_index(self, i: int) -> int:
        return i % self.distinct_planes

    def render_payload(self, i: int) -> bytes:
        """Pixel bytes of instance i (drawn from the seed; pure)."""
        if not self.payload_size:
            return b""
        if self.kind is Kind.SC_MF:
            frames = [self._draw(f, self.z(f)) for f in range(self.frames)]
            return np.stack(frames).tobytes()
        j = self.plane_index(i)
        return self._draw(j, self.z(j)).tobytes()

    def _draw(self, j: int, z: float) -> np.ndarray:
        rng = np.random.default_rng([self.pixel_seed, j])
        z_rel = z - self.centre_z
        g = grid(self.rows, self.cols, self.spacing)
        if self.kind is Kind.CT:
            return ct_plane(g, z_rel, rng)
        if self.kind is Kind.PT:
            return pt_plane(g, z_rel, rng)
        return mr_plane(g, z_rel, rng)

    def file_bytes(self, i: int) -> bytes:
        return self.header(i) + self.render_payload(i)


def _xy_text(x0: float, y0: float) -> str:
    return f"{decimal_string(x0)}\\{decimal_string(y0)}\\"


_CROSS_SECTIONS = frozenset((Kind.CT, Kind.MR, Kind.PT))


def _instance_values(kind: Kind, sop_prefix: str, i: int, xy_text: str,
                     z: float) -> dict[str, str | int]:
    """`xy_text` is ImagePositionPatient's x and y, as `_xy_text` writes them."""
    number = str(i + 1)
    out: dict[str, str | int] = {"SOPInstanceUID": f"{sop_prefix}.{number}",
                                 "InstanceNumber": number}
    if kind in _CROSS_SECTIONS:
        z_text = decimal_string(z)
        out["AcquisitionNumber"] = "1"
        out["ImagePositionPatient"] = xy_text + z_text
        out["SliceLocation"] = z_text
        if kind is Kind.PT:
            out["ImageIndex"] = i + 1
    return out


def _varying_length(values: dict[str, str | int]) -> int:
    # The SOP instance UID is written twice: in the file meta and in the dataset.
    meta = encoded_length("MediaStorageSOPInstanceUID", values["SOPInstanceUID"])
    return meta + sum(encoded_length(k, v) for k, v in values.items())


# Sized for the nlst profile's geometries (about 530: image counts by thickness), so
# that listing its patients' series finds their totals here once the walk is warm.
@functools.lru_cache(maxsize=1024)
def _varying_total(kind: Kind, count: int, prefix_length: int, x0: float, y0: float,
                   z0: float, thickness: float) -> int:
    # Only the lengths of the SOP UIDs matter here, so any prefix of the right length
    # gives the same total; that lets every series of one geometry share the result.
    prefix, xy_text = "1" * prefix_length, _xy_text(x0, y0)
    return sum(_varying_length(_instance_values(kind, prefix, i, xy_text, z0 + i * thickness))
               for i in range(count))


# ---------------------------------------------------------------------------------------
# Planning a profile's series


def patient_values(patient: PatientSpec) -> dict[str, str | None]:
    """The patient-level header values of every instance of `patient`."""
    return {"PatientName": patient.name or patient.patient_id,
            "PatientID": patient.patient_id,
            "PatientBirthDate": _da(patient.birth_date),
            "PatientSex": patient.sex,
            "EthnicGroup": patient.ethnic_group}


def plan_series(seed: int, collection: str, patient: PatientSpec, study: StudySpec,
                study_index: int, series_index: int,
                plans_so_far: list[SeriesPlan], uid: UidMaker = make_uid) -> SeriesPlan:
    """Turn one SeriesSpec into a plan; `plans_so_far` holds the study's earlier plans."""
    spec = study.series[series_index]
    traits = TRAITS[spec.kind]
    key = (seed, collection, patient.patient_id, study_index)
    study_uid = uid(*key, "study")
    series_uid = uid(*key, "series", series_index)
    matrix = spec.matrix or traits.matrix
    count = 1 if spec.kind in (Kind.SC_MF, Kind.RTSTRUCT) else spec.count
    frames = spec.count if spec.kind is Kind.SC_MF else 1
    thickness = spec.thickness_mm or traits.thickness_mm
    spacing = traits.fov_mm / matrix if matrix else 0.0
    series_time = f"{9 + (30 + 5 * series_index) // 60:02d}{(30 + 5 * series_index) % 60:02d}00"
    values: dict[str, str | int | None] = {
        "SOPClassUID": traits.sop_class_uid,
        "StudyDate": _da(study.date), "SeriesDate": _da(study.date),
        "ContentDate": _da(study.date), "StudyTime": study.time, "SeriesTime": series_time,
        "ContentTime": series_time,
        "Modality": traits.modality,
        "Manufacturer": spec.manufacturer,
        "StudyDescription": study.description,
        "SeriesDescription": spec.description,
        "ManufacturerModelName": spec.model,
        **patient_values(patient),
        "PatientAge": _age(patient.birth_date, study.date),
        "BodyPartExamined": spec.body_part,
        "SoftwareVersions": spec.software,
        "ProtocolName": spec.protocol,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": study.study_id,
        "SeriesNumber": str(spec.number if spec.number is not None else series_index + 1),
        # One frame of reference per study: the patient did not move between series.
        "FrameOfReferenceUID": uid(*key, "frame-of-reference"),
    }
    if traits.image:
        values["PixelSpacing"] = f"{decimal_string(spacing)}\\{decimal_string(spacing)}"
    if spec.kind in (Kind.CT, Kind.MR, Kind.PT):
        values["SliceThickness"] = decimal_string(thickness)
        values["SpacingBetweenSlices"] = decimal_string(thickness)
    if spec.kind is Kind.PT:
        values["NumberOfSlices"] = count
        # Real PET slopes are arbitrary floats; derive one from the series so it varies.
        values["RescaleSlope"] = f"{0.05 + seed_of(series_uid) % 10000 / 100000:.8f}"
    z0 = -150.0 - (max(count, frames) - 1) * thickness / 2
    if spec.kind is Kind.SC_MF:
        values["NumberOfFrames"] = str(frames)
        values["SliceLocationVector"] = "\\".join(decimal_string(z0 + f * thickness)
                                                  for f in range(frames))
    reference = None
    if spec.kind is Kind.RTSTRUCT:
        if spec.references is None or plans_so_far[spec.references].kind is not Kind.CT:
            raise ValueError("an RTSTRUCT must reference an earlier CT series of its study")
        reference = plans_so_far[spec.references]
        values["StructureSetDate"] = _da(study.date)
        values["StructureSetTime"] = series_time
    return SeriesPlan(
        kind=spec.kind, series_uid=series_uid, count=count, frames=frames,
        rows=matrix, cols=matrix, spacing=spacing, thickness=thickness, z0=z0,
        values={k: v for k, v in values.items() if v is not None},
        pixel_seed=seed_of(seed, series_uid),
        distinct_planes=min(spec.distinct_planes or count, count),
        reference=reference,
        sop_prefix=uid(series_uid, "sop", digits=30),
    )


def plan_patient(seed: int, collection: str, patient: PatientSpec,
                 uid: UidMaker = make_uid) -> list[SeriesPlan]:
    plans: list[SeriesPlan] = []
    for s, study in enumerate(patient.studies):
        study_plans: list[SeriesPlan] = []
        for k in range(len(study.series)):
            study_plans.append(plan_series(seed, collection, patient, study, s, k, study_plans,
                                           uid))
        plans += study_plans
    return plans
