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
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence

# The TCIA root with a private arc ("99") for synthetic data, so generated UIDs never
# collide with real TCIA ones.
UID_ROOT = "1.3.6.1.4.1.9328.50.99."
_UID_DIGITS = 38  # fixed width: 23 + 38 = 61 characters, within the 64 limit
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1"
IMPLEMENTATION_VERSION = "TCIAFS_EMU_1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# What RT planning systems put in RTReferencedStudySequence (a retired class, still used).
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# Bump whenever the bytes produced for an unchanged profile change, so that a demo
# written by an older generator is regenerated instead of being mixed with new code.
GENERATOR_VERSION = 1

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT",
                       "SV", "UV"})
_PIXEL_DATA_TAG = 0x7FE00010
_PREAMBLE = b"\0" * 128 + b"DICM"


def make_uid(*parts: object, digits: int = _UID_DIGITS) -> str:
    """A valid UID derived from `parts`: the root plus a fixed number of hashed digits.

    Fixed width matters: every UID of a kind has the same length, so header sizes do not
    depend on hash luck. The leading digit is never 0 (UID components forbid it).
    """
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    low = 10 ** (digits - 1)
    number = low + int.from_bytes(digest, "big") % (9 * low)
    uid = f"{UID_ROOT}{number}"
    assert len(uid) <= 64
    return uid


#: How a plan names its study, series, frame of reference and SOP prefix: `make_uid`, or a
#: scheme of a profile's own with the same parts (the nlst profile's UIDs can be located).
UidMaker = Callable[..., str]


def seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big")


# ---------------------------------------------------------------------------------------
# What a profile asks for


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


# ---------------------------------------------------------------------------------------
# Element encoding (Explicit VR Little Endian)


@functools.cache
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(keyword)


def _value_bytes(vr: str, value: str | int) -> bytes:
    if isinstance(value, int):
        return struct.pack("<H" if vr == "US" else "<I", value)
    raw = value.encode("utf-8")  # SpecificCharacterSet is ISO_IR 192 in every template
    if len(raw) & 1:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _element(tag: int, vr: str, payload: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), len(payload)) + payload
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(payload)) + payload


def encode_value(keyword: str, value: str | int) -> bytes:
    tag, vr = _tag_vr(keyword)
    return _element(tag, vr, _value_bytes(vr, value))


def encoded_length(keyword: str, value: str | int) -> int:
    """Bytes `encode_value` would produce, without building them."""
    _, vr = _tag_vr(keyword)
    if isinstance(value, int):
        n = 2 if vr == "US" else 4
    else:
        n = len(value.encode("utf-8"))
        n += n & 1
    return n + (12 if vr in _LONG_VRS else 8)


def _encode_dataset_elements(ds: Dataset) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        out.append((int(elem.tag), fp.getvalue()))
    return out


@functools.lru_cache(maxsize=16)
def _meta_around(sop_class_uid: str) -> tuple[bytes, bytes]:
    """The file meta elements before and after MediaStorageSOPInstanceUID, the only one
    that differs between the files of a SOP class: encoded once, not once a file."""
    before = (_element(0x00020001, "OB", b"\0\1")
              + encode_value("MediaStorageSOPClassUID", sop_class_uid))
    after = b"".join((encode_value("TransferSyntaxUID", EXPLICIT_VR_LE),
                      encode_value("ImplementationClassUID", IMPLEMENTATION_CLASS_UID),
                      encode_value("ImplementationVersionName", IMPLEMENTATION_VERSION)))
    return before, after


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    before, after = _meta_around(sop_class_uid)
    rest = before + encode_value("MediaStorageSOPInstanceUID", sop_instance_uid) + after
    return _element(0x00020000, "UL", struct.pack("<I", len(rest))) + rest


# ---------------------------------------------------------------------------------------
# Templates: the constant elements of each kind, encoded once by pydicom


def _image_pixel_module(ds: Dataset, rows: int, cols: int, bits_stored: int,
                        signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _common_template(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "tciafs emulator: synthetic data"
    ds.PositionReferenceIndicator = ""


def _cross_section_template(ds: Dataset) -> None:
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.BurnedInAnnotation = "NO"


@functools.lru_cache(maxsize=64)
def _image_template(kind: Kind, rows: int, cols: int) -> tuple[tuple[int, bytes], ...]:
    ds = Dataset()
    _common_template(ds)
    if kind is Kind.CT:
        _cross_section_template(ds)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1600"
        _image_pixel_module(ds, rows, cols, 16, signed=True)
    elif kind is Kind.MR:
        _cross_section_template(ds)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        _image_pixel_module(ds, rows, cols, 12, signed=False)
    elif kind is Kind.PT:
        _cross_section_template(ds)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.DecayCorrection = "START"
        ds.DecayFactor = "1"
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = "180000"
        ds.RescaleIntercept = "0"
        drug = Dataset()
        drug.Radiopharmaceutical = "Fluorodeoxyglucose"
        drug.RadiopharmaceuticalStartTime = "083000"
        drug.RadionuclideTotalDose = "370000000"
        drug.RadionuclideHalfLife = "6586.2"
        ds.RadiopharmaceuticalInformationSequence = Sequence([drug])
        _image_pixel_module(ds, rows, cols, 16, signed=False)
    elif kind is Kind.SC_MF:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
        ds.FrameIncrementPointer = 0x00182005  # SliceLocationVector
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.BurnedInAnnotation = "NO"
        _image_pixel_module(ds, rows, cols, 12, signed=False)
    else:
        raise ValueError(kind)
    return tuple(_encode_dataset_elements(ds))


# ---------------------------------------------------------------------------------------
# Series plans


def _ds(x: float) -> str:
    return f"{x:.6f}"


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

    def instance_values(self, i: int) -> dict[str, str | int]:
        return _instance_values(self.kind, self.sop_prefix, i, *self.origin_xy, self.z(i))

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
        meta = len(_file_meta(self.sop_class_uid, ""))
        meta -= encoded_length("MediaStorageSOPInstanceUID", "")
        pixel_header = 12 if self.payload_size else 0
        return len(_PREAMBLE) + meta + template + series + pixel_header

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
        parts += [(_tag_vr(k)[0], encode_value(k, v)) for k, v in self.values.items()]
        parts += [(_tag_vr(k)[0], k) for k in self.instance_values(0)]
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

    def _template(self) -> tuple[tuple[int, bytes], ...]:
        if self.kind is Kind.RTSTRUCT:
            return tuple(_encode_dataset_elements(_rtstruct_template(self)))
        return _image_template(self.kind, self.rows, self.cols)

    def header(self, i: int, vals: dict[str, str | int] | None = None) -> bytes:
        """The file up to and including the Pixel Data element header (all of it for RT);
        `vals` are `instance_values(i)` where the caller has them already."""
        vals = vals if vals is not None else self.instance_values(i)
        body = b"".join(s if isinstance(s, bytes) else encode_value(s, vals[s])
                        for s in self._segments)
        tail = b""
        if self.payload_size:
            # Pixel Data is long-VR: tag, "OW", two reserved bytes, 32-bit length.
            tail = struct.pack("<HH2s2xI", _PIXEL_DATA_TAG >> 16, _PIXEL_DATA_TAG & 0xFFFF,
                               b"OW", self.payload_size)
        return _PREAMBLE + _file_meta(self.sop_class_uid, str(vals["SOPInstanceUID"])) + body + tail

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
        grid = _grid(self.rows, self.cols, self.spacing)
        if self.kind is Kind.CT:
            return _ct_plane(grid, z_rel, rng)
        if self.kind is Kind.PT:
            return _pt_plane(grid, z_rel, rng)
        return _mr_plane(grid, z_rel, rng)

    def file_bytes(self, i: int) -> bytes:
        return self.header(i) + self.render_payload(i)


def _instance_values(kind: Kind, sop_prefix: str, i: int, x0: float, y0: float,
                     z: float) -> dict[str, str | int]:
    out: dict[str, str | int] = {"SOPInstanceUID": f"{sop_prefix}.{i + 1}",
                                 "InstanceNumber": str(i + 1)}
    if kind in (Kind.CT, Kind.MR, Kind.PT):
        z_text = _ds(z)
        out["AcquisitionNumber"] = "1"
        out["ImagePositionPatient"] = f"{_ds(x0)}\\{_ds(y0)}\\{z_text}"
        out["SliceLocation"] = z_text
        if kind is Kind.PT:
            out["ImageIndex"] = i + 1
    return out


def _varying_length(values: dict[str, str | int]) -> int:
    # The SOP instance UID is written twice: in the file meta and in the dataset.
    meta = encoded_length("MediaStorageSOPInstanceUID", values["SOPInstanceUID"])
    return meta + sum(encoded_length(k, v) for k, v in values.items())


@functools.lru_cache(maxsize=256)
def _varying_total(kind: Kind, count: int, prefix_length: int, x0: float, y0: float,
                   z0: float, thickness: float) -> int:
    # Only the lengths of the SOP UIDs matter here, so any prefix of the right length
    # gives the same total; that lets every series of one geometry share the result.
    prefix = "1" * prefix_length
    return sum(_varying_length(_instance_values(kind, prefix, i, x0, y0, z0 + i * thickness))
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
        values["PixelSpacing"] = f"{_ds(spacing)}\\{_ds(spacing)}"
    if spec.kind in (Kind.CT, Kind.MR, Kind.PT):
        values["SliceThickness"] = _ds(thickness)
        values["SpacingBetweenSlices"] = _ds(thickness)
    if spec.kind is Kind.PT:
        values["NumberOfSlices"] = count
        # Real PET slopes are arbitrary floats; derive one from the series so it varies.
        values["RescaleSlope"] = f"{0.05 + seed_of(series_uid) % 10000 / 100000:.8f}"
    z0 = -150.0 - (max(count, frames) - 1) * thickness / 2
    if spec.kind is Kind.SC_MF:
        values["NumberOfFrames"] = str(frames)
        values["SliceLocationVector"] = "\\".join(_ds(z0 + f * thickness)
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


# ---------------------------------------------------------------------------------------
# RTSTRUCT: one ROI outlining the CT phantom's nodule

_NODULE_XY = (-80.0, -10.0)  # mm, in the right lung
_NODULE_RADIUS = 10.0


def _nodule_contours(ct: SeriesPlan) -> list[tuple[int, list[str]]]:
    """(CT instance index, ContourData) for each slice that cuts the nodule."""
    out = []
    for i in range(ct.count):
        dz = ct.z(i) - ct.centre_z
        if abs(dz) >= _NODULE_RADIUS:
            continue
        r = (_NODULE_RADIUS**2 - dz**2) ** 0.5
        pts: list[str] = []
        for k in range(16):
            a = 2 * np.pi * k / 16
            pts += [_ds(_NODULE_XY[0] + r * np.cos(a)), _ds(_NODULE_XY[1] + r * np.sin(a)),
                    _ds(ct.z(i))]
        out.append((i, pts))
    return out


def _image_ref(ct: SeriesPlan, i: int) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct.sop_class_uid
    ref.ReferencedSOPInstanceUID = ct.sop_uid(i)
    return ref


def _rtstruct_template(plan: SeriesPlan) -> Dataset:
    ct = plan.reference
    assert ct is not None
    ds = Dataset()
    _common_template(ds)
    del ds.PositionReferenceIndicator  # RT Structure Set has no Frame of Reference module
    ds.OperatorsName = ""
    ds.StructureSetLabel = "NODULE"
    ds.StructureSetName = "Nodule contours"
    ds.ApprovalStatus = "UNAPPROVED"

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct.series_uid
    series_ref.ContourImageSequence = Sequence([_image_ref(ct, i) for i in range(ct.count)])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = str(ct.values["StudyInstanceUID"])
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = str(ct.values["FrameOfReferenceUID"])
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_ref.FrameOfReferenceUID
    roi.ROIName = "Nodule"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])

    contours = []
    for i, points in _nodule_contours(ct):
        contour = Dataset()
        contour.ContourImageSequence = Sequence([_image_ref(ct, i)])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points) // 3
        contour.ContourData = points
        contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = Sequence(contours)
    roi_contour.ReferencedROINumber = 1
    ds.ROIContourSequence = Sequence([roi_contour])

    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([observation])
    return ds


# ---------------------------------------------------------------------------------------
# Phantoms. Coordinates are in mm (patient space), so a 64x64 scale image and a 512x512
# demo image show the same anatomy.


@dataclass(frozen=True)
class _Grid:
    x: np.ndarray  # mm, per column (1 x cols)
    y: np.ndarray  # mm, per row (rows x 1)
    r2: np.ndarray  # squared distance from the centre (rows x cols)


@functools.lru_cache(maxsize=16)
def _grid(rows: int, cols: int, spacing: float) -> _Grid:
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing)[None, :]
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing)[:, None]
    return _Grid(x, y, x * x + y * y)


def _ellipse(g: _Grid, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((g.x - cx) / a) ** 2 + ((g.y - cy) / b) ** 2 <= 1.0


def _taper(z_rel: float, half_length: float) -> float:
    """Organ cross-section scale: full at the centre, shrinking towards the ends."""
    return float(np.sqrt(max(0.15, 1.0 - (z_rel / half_length) ** 2)))


# Noise levels chosen so that zlib level 6 compresses a 512x512 slice about 2.4x,
# as real CT does (measured in the tests).
_CT_NOISE_HU = 10.0
_CT_NOISE_AIR_HU = 14.0
_CT_FOV_RADIUS_MM = 180.0


def _ct_plane(g: _Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    hu = np.full(g.r2.shape, -1000.0, dtype=np.float32)
    hu[_ellipse(g, 0, 10, 155, 105)] = 40.0  # body
    hu[_ellipse(g, 0, 10, 143, 94)] = -90.0  # subcutaneous fat
    hu[_ellipse(g, 0, 10, 133, 85)] = 35.0  # muscle and mediastinum
    lung = _taper(z_rel, 160.0)
    hu[_ellipse(g, -60, 0, 48 * lung, 66 * lung)] = -850.0
    hu[_ellipse(g, 60, 0, 48 * lung, 66 * lung)] = -850.0
    hu[_ellipse(g, 0, 68, 15, 15)] = 700.0  # vertebra
    hu[_ellipse(g, 12, -30, 24, 20)] = 45.0  # heart
    if abs(z_rel) < _NODULE_RADIUS:
        r = np.sqrt(_NODULE_RADIUS**2 - z_rel**2)
        hu[_ellipse(g, *_NODULE_XY, r, r)] = 30.0
    sigma = np.where(hu < -500, _CT_NOISE_AIR_HU, _CT_NOISE_HU).astype(np.float32)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * sigma
    stored = np.rint(hu + 1024.0)
    stored[g.r2 > _CT_FOV_RADIUS_MM**2] = -2000.0  # outside the reconstruction circle
    return stored.astype("<i2")


def _mr_plane(g: _Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    head = _taper(z_rel, 110.0)
    signal = np.zeros(g.r2.shape, dtype=np.float32)
    signal[_ellipse(g, 0, 0, 80 * head, 100 * head)] = 900.0  # scalp and skull marrow
    signal[_ellipse(g, 0, 0, 72 * head, 92 * head)] = 120.0  # skull
    signal[_ellipse(g, 0, 0, 68 * head, 88 * head)] = 600.0  # grey matter
    signal[_ellipse(g, 0, 0, 50 * head, 68 * head)] = 750.0  # white matter
    signal[_ellipse(g, -10, -5, 6 * head, 20 * head)] = 200.0  # ventricles
    signal[_ellipse(g, 10, -5, 6 * head, 20 * head)] = 200.0
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * 18.0
    magnitude = np.hypot(signal + noise[0], noise[1])  # Rician, like a magnitude image
    return np.clip(np.rint(magnitude), 0, 4095).astype("<u2")


def _pt_plane(g: _Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    counts = np.zeros(g.r2.shape, dtype=np.float32)
    counts[_ellipse(g, 0, 10, 155, 105)] = 300.0
    counts[_ellipse(g, 12, -30, 24, 20)] = 1500.0  # myocardium takes up FDG
    if abs(z_rel) < 20:
        counts[_ellipse(g, *_NODULE_XY, 12, 12)] = 4000.0
    counts += rng.standard_normal(counts.shape, dtype=np.float32) * np.sqrt(counts + 25.0) * 3
    return np.clip(np.rint(counts), 0, 65535).astype("<u2")
