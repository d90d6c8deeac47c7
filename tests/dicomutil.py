"""The one DICOM factory of the tests: small files built to order, odd ones included.

The emulator's generator (tciafs.emulator.dicomgen) makes whole, realistic series; tests
that need one file with a particular flaw (a UID only in the meta header, implicit VR,
a hostile string as a UID) build it here, and so does the tiny archive of the emulator's
own tests (tests/test_emulator_support.py), through `new_dataset` and `encode`.
"""

from __future__ import annotations

import io
import warnings

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian


def dicom_bytes(sop: str, series: str = "1.2.3.4", study: str = "1.2.3", patient: str = "P",
                rows: int = 8, *, meta_sop: str | None = None, implicit: bool = False,
                study_date: str | None = None) -> bytes:
    """A small CT image whose dataset names `sop` as its SOPInstanceUID (none if "") and
    whose meta header names `meta_sop` (by default `sop`; none if "").

    Any string is accepted as a UID (1,000 bytes, '/', control characters): hostile
    servers serve such files, and pydicom's value checks are switched off for them.
    """
    meta_sop = sop if meta_sop is None else meta_sop
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        ds = new_dataset(CTImageStorage, sop, meta_sop=meta_sop, implicit=implicit)
        if study_date is not None:
            ds.StudyDate = study_date
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientID = patient
        ds.Modality = "CT"
        ds.Rows = ds.Columns = rows
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes((i * 7 + len(sop)) % 256 for i in range(rows * rows * 2))
        # A file without a meta header UID cannot be a conformant Part 10 file.
        return encode(ds, conformant=bool(meta_sop))


def new_dataset(sop_class: str, sop: str, *, meta_sop: str | None = None,
                implicit: bool = False) -> Dataset:
    """A dataset of `sop_class` named `sop` (none if ""), with its Part 10 meta header
    (naming `meta_sop`, by default `sop`), ready for the caller's attributes."""
    meta_sop = sop if meta_sop is None else meta_sop
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    if meta_sop:
        ds.file_meta.MediaStorageSOPInstanceUID = meta_sop
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    if sop:
        ds.SOPInstanceUID = sop
    return ds


def encode(ds: Dataset, *, conformant: bool = True) -> bytes:
    """The dataset as the bytes of a file (a Part 10 file when conformant)."""
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=conformant)
    return out.getvalue()
