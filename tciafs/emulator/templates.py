"""The constant elements of each kind of file, encoded once by pydicom: the images'
templates, and the RTSTRUCT's (one ROI outlining the CT phantom's nodule).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tciafs.emulator.elements import decimal_string, encode_dataset_elements
from tciafs.emulator.phantoms import NODULE_RADIUS, NODULE_XY
from tciafs.emulator.specs import Kind

if TYPE_CHECKING:
    from tciafs.emulator.dicomgen import SeriesPlan

# What RT planning systems put in RTReferencedStudySequence (a retired class, still used).
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


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
def image_template(kind: Kind, rows: int, cols: int) -> tuple[tuple[int, bytes], ...]:
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
    return tuple(encode_dataset_elements(ds))


# ---------------------------------------------------------------------------------------
# RTSTRUCT: one ROI outlining the CT phantom's nodule


def _nodule_contours(ct: SeriesPlan) -> list[tuple[int, list[str]]]:
    """(CT instance index, ContourData) for each slice that cuts the nodule."""
    out = []
    for i in range(ct.count):
        dz = ct.z(i) - ct.centre_z
        if abs(dz) >= NODULE_RADIUS:
            continue
        r = (NODULE_RADIUS**2 - dz**2) ** 0.5
        pts: list[str] = []
        for k in range(16):
            a = 2 * np.pi * k / 16
            pts += [decimal_string(NODULE_XY[0] + r * np.cos(a)),
                    decimal_string(NODULE_XY[1] + r * np.sin(a)), decimal_string(ct.z(i))]
        out.append((i, pts))
    return out


def _image_ref(ct: SeriesPlan, i: int) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct.sop_class_uid
    ref.ReferencedSOPInstanceUID = ct.sop_uid(i)
    return ref


def rtstruct_template(plan: SeriesPlan) -> Dataset:
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
