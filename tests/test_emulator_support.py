"""A tiny in-memory archive for the emulator's server tests, and helpers to serve it.

The archive is built with pydicom (8x8 or 64x64 images), independent of the real
generator, so the HTTP layer can be tested on its own.  Running this file as a script
serves it through ``tciafs.emulator.cli.run`` (used by the CLI/signal tests).

It holds no tests itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pydicom
from dicomutil import encode, new_dataset
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, generate_uid

from tciafs.emulator.auth import User, UserDB
from tciafs.emulator.model import (
    CollectionFacts,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from tciafs.emulator.server import EmulatorServers, Options

CT_LUNG = "Tiny-CT Lung_2"
MR_BRAIN = "Tiny MR Brain"
RESTRICTED = "Tiny-Restricted"
NLST = "NLST-Tiny"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

USERS = {"alice": User("alice", "wonderland", frozenset({RESTRICTED})),
         "bob": User("bob", "builder", frozenset({"*"})),
         "carol": User("carol", "singer", frozenset())}
API_KEY = "legacy-key-123"


def uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["tciafs-tiny", *map(str, parts)])


def _facts(name: str, released: dt.date, restricted: bool = False, host: str = "main",
           short: str = "CC BY 4.0") -> CollectionFacts:
    url = "https://creativecommons.org/licenses/by/4.0/" if short == "CC BY 4.0" else \
        "http://creativecommons.org/licenses/by/3.0/"
    long = ("Creative Commons Attribution 4.0 International License" if short == "CC BY 4.0"
            else "Creative Commons Attribution 3.0 Unported License")
    return CollectionFacts(name, long, short, url, f"https://doi.org/10.0000/{name}",
                           released, f"Site of {name}", f"<p>About {name}</p>", restricted,
                           host)


COLLECTIONS = {
    CT_LUNG: _facts(CT_LUNG, dt.date(2020, 3, 15)),
    MR_BRAIN: _facts(MR_BRAIN, dt.date(2022, 6, 1), short="CC BY 3.0"),
    RESTRICTED: _facts(RESTRICTED, dt.date(2021, 1, 1), restricted=True),
    NLST: _facts(NLST, dt.date(2019, 1, 1), host="nlst"),
}


@dataclass(frozen=True)
class SeriesPlan:
    key: str
    collection: str
    patient: str
    study: str
    modality: str
    count: int
    body_part: str | None
    manufacturer: str | None
    acquisitions: int = 1
    size: int = 8  # image side
    noise: bool = False


PLANS = [
    SeriesPlan("ct-a", CT_LUNG, "TCL-001", "s1", "CT", 12, "CHEST", "SIEMENS", acquisitions=2),
    SeriesPlan("seg-b", CT_LUNG, "TCL-001", "s1", "SEG", 1, None, "Siemens"),
    SeriesPlan("ct-big", CT_LUNG, "TCL-001", "s1", "CT", 40, "CHEST", "SIEMENS", size=96,
               noise=True),
    SeriesPlan("ct-c", CT_LUNG, "TCL 002/b", "s2", "CT", 5, "LUNG", None),
    SeriesPlan("mr-d", MR_BRAIN, ".hidden-pt", "s3", "MR", 3, "BRAIN", "GE MEDICAL SYSTEMS"),
    SeriesPlan("mr-e", MR_BRAIN, "Zoë-1", "s4", "MR", 3, "HEAD", "GE MEDICAL SYSTEMS"),
    SeriesPlan("ct-f", RESTRICTED, "R-1", "s5", "CT", 2, "ABDOMEN", "TOSHIBA"),
    SeriesPlan("ct-g", NLST, "100001", "s6", "CT", 4, "CHEST", "GE MEDICAL SYSTEMS"),
]
PATIENTS = {  # id -> (collection, sex, birth date)
    "TCL-001": (CT_LUNG, "F", dt.date(1950, 1, 2)),
    "TCL 002/b": (CT_LUNG, None, None),
    ".hidden-pt": (MR_BRAIN, "M", dt.date(1961, 7, 8)),
    "Zoë-1": (MR_BRAIN, "O", None),
    "R-1": (RESTRICTED, "M", None),
    "100001": (NLST, "F", dt.date(1940, 12, 31)),
}
STUDY_DATES = {"s1": dt.date(2001, 2, 3), "s2": dt.date(2002, 3, 4), "s3": dt.date(2003, 4, 5),
               "s4": dt.date(2004, 5, 6), "s5": dt.date(2005, 6, 7), "s6": dt.date(2006, 7, 8)}


def _dataset(plan: SeriesPlan, n: int, acq: int, inst_no: int,
             comment: str | None = None) -> Dataset:
    sop_class = {"CT": CTImageStorage, "MR": MR_STORAGE, "SEG": SEG_STORAGE}[plan.modality]
    ds = new_dataset(sop_class, uid(plan.key, n))
    ds.Modality, ds.PatientID = plan.modality, plan.patient
    ds.PatientName = plan.patient.replace(" ", "^")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(plan.study), uid(plan.key)
    ds.StudyDate = STUDY_DATES[plan.study].strftime("%Y%m%d")
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 3, inst_no, acq
    ds.ImagePositionPatient = [0, 0, float(inst_no)]
    ds.PixelSpacing = ["0.703125", "0.703125"]
    if plan.body_part:
        ds.BodyPartExamined = plan.body_part
    if plan.modality == "SEG":
        ref = Dataset()
        ref.SeriesInstanceUID = uid("ct-a")
        inner = Dataset()
        inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = CTImageStorage, uid("ct-a", 1)
        ref.ReferencedInstanceSequence = Sequence([inner])
        ds.ReferencedSeriesSequence = Sequence([ref])
    if plan.key == "ct-a" and n == 1:
        ds.add_new(0x60000010, "US", 8)
        ds.add_new(0x60003000, "OW", b"\0" * 8)
    rng = np.random.default_rng(zlib.crc32(f"{plan.key}:{n}".encode()))
    pixels = (rng.integers(-1000, 1000, (plan.size, plan.size)) if plan.noise
              else np.full((plan.size, plan.size), n)).astype(np.int16)
    ds.Rows = ds.Columns = plan.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    if comment is not None:
        ds.ImageComments = comment
    return ds


class TinyArchive:
    """An in-memory implementation of ``tciafs.emulator.model.Archive``."""

    def __init__(self) -> None:
        self.collections = dict(COLLECTIONS)
        self._files: dict[tuple[str, str], bytes] = {}
        self._instances: dict[str, list[InstanceRecord]] = {}
        self._series: list[SeriesRecord] = []
        for plan in PLANS:
            self._add_series(plan)
        self._patients = [PatientRecord(c, pid, pid.replace(" ", "^"), birth, sex, None)
                          for pid, (c, sex, birth) in PATIENTS.items()]
        studies = {(p.collection, p.patient, p.study) for p in PLANS}
        self._studies = [StudyRecord(c, pid, uid(st), STUDY_DATES[st], f"Study {st}", st.upper(),
                                     "061Y") for c, pid, st in sorted(studies)]

    def submit(self, plan: SeriesPlan, comment: str, submitted: dt.datetime) -> None:
        """Add a series, or replace it as a site that re-submits it to NBIA does: the same
        UIDs, other bytes (ImageComments `comment`), a later submission timestamp."""
        self._series = [s for s in self._series if s.series_instance_uid != uid(plan.key)]
        self._add_series(plan, comment, submitted)

    def withdraw(self, plan: SeriesPlan) -> None:
        """Take a series out of the archive, as TCIA does with data it retracts."""
        self._series = [s for s in self._series if s.series_instance_uid != uid(plan.key)]
        self._instances.pop(uid(plan.key), None)
        self._files = {k: v for k, v in self._files.items() if k[0] != uid(plan.key)}
        # The service lists patients and studies from their series: none left, none shown.
        self._studies = [s for s in self._studies if any(
            r.study_instance_uid == s.study_instance_uid for r in self._series)]
        self._patients = [p for p in self._patients if any(
            r.patient_id == p.patient_id for r in self._series)]

    def _add_series(self, plan: SeriesPlan, comment: str | None = None,
                    submitted: dt.datetime = dt.datetime(2019, 5, 6, 7, 8, 9)) -> None:
        records = []
        per_acq = -(-plan.count // plan.acquisitions)
        # Store in a scrambled order: the server must not rely on instance order.
        for n in sorted(range(1, plan.count + 1), key=lambda k: (k * 7) % plan.count):
            acq = (n - 1) // per_acq + 1
            data = encode(_dataset(plan, n, acq, n, comment))
            self._files[(uid(plan.key), uid(plan.key, n))] = data
            sop_class = pydicom.dcmread(io.BytesIO(data)).SOPClassUID
            records.append(InstanceRecord(uid(plan.key, n), sop_class, n, acq, len(data),
                                          hashlib.md5(data).hexdigest()))
        self._instances[uid(plan.key)] = records
        self._series.append(SeriesRecord(
            plan.collection, plan.patient, uid(plan.study), uid(plan.key), plan.modality,
            f"protocol {plan.key}", STUDY_DATES[plan.study], f"Series {plan.key} (test)",
            plan.body_part, 3, plan.manufacturer, "Model, X" if plan.manufacturer else None,
            "1.0", "0.703125", "1.250000", len(records), sum(r.size for r in records),
            submitted))

    def patients(self, collection: str | None = None, patient_id: str | None = None
                 ) -> list[PatientRecord]:
        return [p for p in self._patients
                if _ci(p.collection, collection) and _ci(p.patient_id, patient_id)]

    def studies(self, collection: str | None = None, patient_id: str | None = None
                ) -> list[StudyRecord]:
        return [s for s in self._studies
                if _ci(s.collection, collection) and _ci(s.patient_id, patient_id)]

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_instance_uid: str | None = None) -> list[SeriesRecord]:
        return [s for s in self._series
                if _ci(s.collection, collection) and _ci(s.patient_id, patient_id)
                and study_instance_uid in (None, s.study_instance_uid)]

    def series_by_uid(self, series_instance_uid: str) -> SeriesRecord | None:
        return next((s for s in self._series if s.series_instance_uid == series_instance_uid),
                    None)

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        return list(self._instances.get(series_instance_uid, []))

    def series_of_instance(self, sop_instance_uid: str) -> str | None:
        return next((series for series, sop in self._files if sop == sop_instance_uid), None)

    def instance_bytes(self, series_instance_uid: str, sop_instance_uid: str) -> bytes | None:
        return self._files.get((series_instance_uid, sop_instance_uid))

    def iter_instance_chunks(self, series_instance_uid: str, sop_instance_uid: str,
                             chunk_size: int = 65536) -> Iterator[bytes]:
        data = self._files[(series_instance_uid, sop_instance_uid)]
        for start in range(0, len(data), chunk_size):
            yield data[start:start + chunk_size]

    def dicom_tags(self, series_instance_uid: str) -> object | None:
        records = sorted(self._instances.get(series_instance_uid, []),
                         key=lambda r: r.instance_number or 0)
        if not records:
            return None
        data = self._files[(series_instance_uid, records[0].sop_instance_uid)]
        return pydicom.dcmread(io.BytesIO(data))


def _ci(value: str, wanted: str | None) -> bool:
    return wanted is None or value.upper() == wanted.upper()


@lru_cache(maxsize=1)
def tiny_archive() -> TinyArchive:
    return TinyArchive()


def serve_tiny(**overrides: object) -> EmulatorServers:
    """Start both servers in this process on free ports (use as a context manager)."""
    options = Options(nlst_port=0, users=UserDB(dict(USERS), frozenset({API_KEY})))
    for key, value in overrides.items():
        setattr(options, key, value)
    return EmulatorServers(tiny_archive(), options)


if __name__ == "__main__":
    # `python tests/test_emulator_support.py [emulator args]`: the real CLI over TinyArchive.
    import argparse

    from tciafs.emulator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(), archive=tiny_archive()))
