"""The one DICOM factory of the tests: small files built to order, odd ones included.

The emulator's generator (tciafs.emulator.dicomgen) makes whole, realistic series; tests
that need one file with a particular flaw (a UID only in the meta header, implicit VR,
a hostile string as a UID) build it here.
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
        ds = Dataset()
        ds.file_meta = _file_meta(meta_sop, implicit)
        ds.preamble = b"\0" * 128
        ds.SOPClassUID = CTImageStorage
        if sop:
            ds.SOPInstanceUID = sop
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
        out = io.BytesIO()
        # A file without a meta header UID cannot be a conformant Part 10 file.
        pydicom.dcmwrite(out, ds, enforce_file_format=bool(meta_sop))
    return out.getvalue()


def _file_meta(meta_sop: str, implicit: bool) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    if meta_sop:
        meta.MediaStorageSOPInstanceUID = meta_sop
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return meta
