"""What the emulator lists of a series' instances: the same bytes as ever, and records
that match the files served; and dates read as they always were.

Listing a series (getSOPInstanceUIDs orders its answer by MD5) makes every instance's
header and hashes it with its pixels, through a path tuned for speed; these tests hold
that path to the files it stands for, and to digests taken before it was tuned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

import pytest
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from tciafs.emulator import wire
from tciafs.emulator.archive import GeneratedArchive, load_archive
from tciafs.emulator.dicomgen import plan_patient
from tciafs.emulator.elements import encode_value, encoded_length, tag_vr
from tciafs.emulator.model import CollectionFacts
from tciafs.emulator.patientwise import PatientwiseArchive
from tciafs.emulator.profiles import CollectionSpec, Profile, demo
from tciafs.emulator.records import patient_record, values_getter
from tciafs.emulator.specs import Kind, PatientSpec, SeriesSpec, StudySpec

# Taken from the generator before its listing path was tuned. A change here means the
# emulator serves other bytes: bump GENERATOR_VERSION (dicomgen) if that is meant. The
# pixels come from numpy's seeded generator, so a numpy that changes its normal
# stream changes them too.
DEMO_FILES_SHA256 = "56aec0a5a836a64caa2b5feae902a04597d34bd2afb33995a99328f02ac4b239"
NLST_LISTINGS_SHA256 = "8faca11e499f9e2b519d4181c11f6f5abed6acfbbe58c3a0a9cd909251d15e74"


def _demo_files_digest() -> str:
    """Every demo series' size, and the bytes of its first and last file."""
    digest = hashlib.sha256()
    profile = demo()
    for coll in profile.collections:
        for patient in coll.patients:
            for plan in plan_patient(profile.seed, coll.facts.name, patient):
                digest.update(str(plan.file_size()).encode())
                for i in sorted({0, plan.count - 1}):
                    digest.update(plan.file_bytes(i))
    return digest.hexdigest()


def _nlst_listings_digest() -> str:
    """Three NLST patients' series records, and each series' instance records and
    getSOPInstanceUIDs body, in the order served."""
    archive = load_archive("nlst")
    assert isinstance(archive, PatientwiseArchive)
    drawn = archive.profile.drawn[0]
    digest = hashlib.sha256()
    for index in (0, 7_000, 26_409):
        for series in archive.series("NLST", drawn.patient_id(index)):
            digest.update(repr(series).encode())
            records = wire.default_order(archive.instances(series.series_instance_uid))
            digest.update(wire.jettison_json(("SOPInstanceUID",),
                                             [(r.sop_instance_uid,) for r in records]))
            digest.update(repr(records).encode())
    return digest.hexdigest()


@pytest.mark.unit
def test_files_and_listings_are_the_bytes_they_always_were() -> None:
    assert _demo_files_digest() == DEMO_FILES_SHA256
    assert _nlst_listings_digest() == NLST_LISTINGS_SHA256


@pytest.mark.unit
@pytest.mark.parametrize(("keyword", "value"), [
    ("SOPInstanceUID", "1.2.34"),  # even UI
    ("SOPInstanceUID", "1.2.3"),  # odd UI: padded with a NUL
    ("InstanceNumber", "7"),  # odd IS: padded with a space
    ("ImagePositionPatient", "-1.000000\\2.500000\\-150.000000"),
    ("SliceLocation", "12.500000"),
    ("PatientName", "Tïny^Ünïcode"),  # PN in UTF-8
    ("ImageIndex", 3),  # US
    ("NumberOfSlices", 40),  # US
    ("SimpleFrameList", 9),  # UL
    ("AdmittingDiagnosesDescription", "odd"),  # LO
    ("RetrieveURL", "http://x/odd"),  # UR: a long VR
])
def test_the_encoder_writes_what_pydicom_writes(keyword: str, value: str | int) -> None:
    tag, vr = tag_vr(keyword)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_data_element(out, DataElement(tag, vr, value), encodings=["utf_8"])
    assert encode_value(keyword, value) == out.getvalue()
    assert encoded_length(keyword, value) == len(out.getvalue())


def _every_kind() -> Profile:
    """Made on demand: a CT series with more planes than a listing holds, one with two,
    and one series of every other kind."""
    facts = CollectionFacts(
        name="Listing", license_name="Creative Commons Attribution 4.0",
        license_short="CC BY 4.0", license_uri="https://creativecommons.org/licenses/by/4.0/",
        doi="https://doi.org/10.7937/LISTING", date_released=dt.date(2024, 1, 2),
        site="Listing", description="listing")
    series = (
        SeriesSpec(Kind.CT, 20, "every slice its own plane", matrix=16),
        SeriesSpec(Kind.CT, 25, "two planes", matrix=16, distinct_planes=2),
        SeriesSpec(Kind.RTSTRUCT, 1, "rt", references=0),
        SeriesSpec(Kind.MR, 3, "mr", matrix=16),
        SeriesSpec(Kind.PT, 3, "pt", matrix=16),
        SeriesSpec(Kind.SC_MF, 4, "sc", matrix=16),
    )
    patient = PatientSpec("L-01", "F", dt.date(1970, 1, 1),
                          (StudySpec(dt.date(2020, 2, 3), "study", "1", series),))
    return Profile("listing", 11, (CollectionSpec(facts, (patient,)),), on_disk=False)


@pytest.mark.unit
def test_every_record_listed_matches_the_file_served() -> None:
    archive = load_archive(_every_kind())
    assert isinstance(archive, GeneratedArchive)
    all_series = archive.series()
    assert {s.modality for s in all_series} == {"CT", "RTSTRUCT", "MR", "PT", "OT"}
    for series in all_series:
        uid = series.series_instance_uid
        records = archive.instances(uid)
        assert len(records) == series.image_count
        assert sum(r.size for r in records) == series.file_size
        for record in records:
            data = archive.instance_bytes(uid, record.sop_instance_uid)
            assert data is not None and len(data) == record.size
            assert hashlib.md5(data).hexdigest() == record.md5
    # Each distinct plane drawn once, the many-planed series' too.
    assert archive.planes_drawn == 20 + 2 + 3 + 3 + 4


@pytest.mark.unit
@pytest.mark.parametrize("text", ["19440229", "20001231", "00010101", "99991231",
                                  "20010229", "20201301", "20200100", "2020111", "2020-1-1",
                                  "202011", "２０２００１０１"])
def test_a_date_reads_as_strptime_reads_it(text: str) -> None:
    def read(parse: Callable[[], object]) -> object:
        try:
            return parse()
        except ValueError:
            return ValueError
    get = values_getter({"PatientID": "P", "PatientBirthDate": text})
    expected = read(lambda: dt.datetime.strptime(text, "%Y%m%d").date())
    assert read(lambda: patient_record("C", get).patient_birth_date) == expected
