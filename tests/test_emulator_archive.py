"""The emulator's archives: generated DICOM checked by real tools, and the records served."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import re
import subprocess
import time
import zlib
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from tciafs.emulator import archive as archive_mod
from tciafs.emulator.archive import (
    DiskArchive,
    GeneratedArchive,
    dataset_getter,
    ensure_on_disk,
    fingerprint,
    generate_to_disk,
    load_archive,
)
from tciafs.emulator.dicomgen import (
    EXPLICIT_VR_LE,
    Kind,
    PatientSpec,
    SeriesSpec,
    StudySpec,
    make_uid,
)
from tciafs.emulator.model import CollectionFacts
from tciafs.emulator.profiles import CollectionSpec, Profile, demo
from tciafs.emulator.records import series_record

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def tiny_profile(seed: int = 7, on_disk: bool = True) -> Profile:
    """Every kind once, small enough to generate twice in a fraction of a second."""
    facts = CollectionFacts(
        name="Tiny Test-Collection_1", license_name="Creative Commons Attribution 4.0",
        license_short="CC BY 4.0", license_uri="https://creativecommons.org/licenses/by/4.0/",
        doi="https://doi.org/10.7937/TINY", date_released=dt.date(2024, 1, 2), site="Tiny",
        description="tiny")
    series = (
        SeriesSpec(Kind.CT, 3, "ct", body_part="CHEST", manufacturer="GE MEDICAL SYSTEMS"),
        SeriesSpec(Kind.RTSTRUCT, 1, "rt", references=0),
        SeriesSpec(Kind.MR, 2, "mr"),
        SeriesSpec(Kind.PT, 2, "pt", manufacturer="Siemens"),
        SeriesSpec(Kind.SC_MF, 3, "sc"),
    )
    patient = PatientSpec("Tïny 01/.x", "F", dt.date(1970, 1, 1),
                          (StudySpec(dt.date(2020, 2, 3), "study & more", "9", series),))
    return Profile("tiny", seed, (CollectionSpec(facts, (patient,)),), on_disk=on_disk)


@pytest.fixture(scope="session")
def demo_archive(demo_data_dir: Path) -> DiskArchive:
    archive = load_archive("demo", demo_data_dir)
    assert isinstance(archive, DiskArchive)
    return archive


@pytest.fixture(scope="session")
def scale_archive() -> GeneratedArchive:
    archive = load_archive("scale", None)
    assert isinstance(archive, GeneratedArchive)
    return archive


def first_file(archive: DiskArchive, modality: str) -> Path:
    series = next(s for s in archive.series() if s.modality == modality)
    first = archive.instances(series.series_instance_uid)[0]
    path = archive.path(series.series_instance_uid, first.sop_instance_uid)
    assert path is not None
    return path


def series_dir(archive: DiskArchive, modality: str) -> tuple[Path, int]:
    series = next(s for s in archive.series() if s.modality == modality)
    return archive.root / series.series_instance_uid, series.image_count


# ---------------------------------------------------------------------------------------
# The generator


def test_uids_are_valid_fixed_width_and_derived() -> None:
    uids = {make_uid("x", i) for i in range(200)}
    assert len(uids) == 200
    assert {len(u) for u in uids} == {61}
    assert all(UID_RE.match(u) for u in uids)
    assert make_uid("x", 1) == make_uid("x", 1) != make_uid("x", 2)


def test_generation_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    trees = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        root = tmp_path / name
        root.mkdir()
        generate_to_disk(tiny_profile(seed), root)
        trees.append({p.relative_to(root): p.read_bytes()
                      for p in sorted(root.rglob("*")) if p.is_file()})
    assert len(trees[0]) == 1 + 3 + 1 + 2 + 2 + 1  # index and every file
    assert trees[0] == trees[1]
    assert set(trees[0]).isdisjoint(set(trees[2]) - {Path("index.json")})  # seed matters


def test_generated_sizes_md5s_and_chunks_match_bytes() -> None:
    archive = GeneratedArchive(tiny_profile(on_disk=False))
    for collection in archive.collections:
        for patient in archive.patients(collection):
            assert archive.studies(collection, patient.patient_id)
            assert archive.series(collection, patient.patient_id)
    assert archive.planes_drawn == 0  # listed down to the series, nothing drawn
    for series in archive.series():
        records = archive.instances(series.series_instance_uid)
        assert len(records) == series.image_count
        total = 0
        for rec in records:
            data = archive.instance_bytes(series.series_instance_uid, rec.sop_instance_uid)
            assert data is not None
            assert len(data) == rec.size
            assert hashlib.md5(data).hexdigest() == rec.md5
            chunks = list(archive.iter_instance_chunks(series.series_instance_uid,
                                                       rec.sop_instance_uid, 4096))
            assert b"".join(chunks) == data
            assert max(len(c) for c in chunks) <= 4096
            total += len(data)
        assert total == series.file_size


def test_on_demand_records_equal_records_read_back_from_files(
        demo_archive: DiskArchive) -> None:
    """The scale/bench path (values the encoder writes) and the demo path (headers read
    back from disk) must give the same metadata and the same bytes."""
    generated = GeneratedArchive(dataclasses.replace(demo(), on_disk=False))
    assert generated.patients() == demo_archive.patients()
    assert generated.studies() == demo_archive.studies()
    assert generated.series() == demo_archive.series()
    for series in demo_archive.series():
        uid = series.series_instance_uid
        assert generated.instances(uid) == demo_archive.instances(uid)
        last = demo_archive.instances(uid)[-1].sop_instance_uid
        assert generated.instance_bytes(uid, last) == demo_archive.instance_bytes(uid, last)


# ---------------------------------------------------------------------------------------
# The demo on disk


def test_demo_files_match_their_records(demo_archive: DiskArchive) -> None:
    for series in demo_archive.series():
        records = demo_archive.instances(series.series_instance_uid)
        assert len(records) == series.image_count
        assert sum(r.size for r in records) == series.file_size
        for rec in records:
            path = demo_archive.path(series.series_instance_uid, rec.sop_instance_uid)
            assert path is not None
            data = path.read_bytes()
            assert len(data) == rec.size
            assert hashlib.md5(data).hexdigest() == rec.md5
        chunks = demo_archive.iter_instance_chunks(series.series_instance_uid,
                                                   records[0].sop_instance_uid, 1000)
        assert b"".join(chunks) == demo_archive.instance_bytes(series.series_instance_uid,
                                                               records[0].sop_instance_uid)


def test_demo_is_part10_with_consistent_meta(demo_archive: DiskArchive) -> None:
    for series in demo_archive.series():
        rec = demo_archive.instances(series.series_instance_uid)[0]
        data = demo_archive.instance_bytes(series.series_instance_uid, rec.sop_instance_uid)
        assert data is not None
        assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
        ds = pydicom.dcmread(io.BytesIO(data))
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == EXPLICIT_VR_LE
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == rec.sop_class_uid
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == rec.sop_instance_uid
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert len(uid) <= 64 and UID_RE.match(uid)


def test_demo_contents_and_awkward_names(demo_archive: DiskArchive) -> None:
    names = list(demo_archive.collections)
    assert any(" " in n for n in names) and any("_" in n for n in names)
    assert all("-" in n for n in names)
    facts = demo_archive.collections.values()
    assert [f.name for f in facts if f.restricted] == ["Demo-Restricted Prostate_MR"]
    assert [f.name for f in facts if f.host == "nlst"] == ["NLST-Demo"]
    ids = {p.patient_id for p in demo_archive.patients()}
    assert {"LUNG-001", "LUNG 002", "LUNG/003", ".MRB-006", "Pétra-005"} <= ids
    assert {s.modality for s in demo_archive.series()} == {"CT", "MR", "PT", "OT", "RTSTRUCT"}
    ct = [s for s in demo_archive.series() if s.collection == "Demo-Lung CT_2024"
          and s.modality == "CT"]
    assert ct and max(s.image_count for s in ct) >= 40
    total = sum(s.file_size for s in demo_archive.series())
    assert total < 80_000_000, total


def test_demo_headers_carry_served_fields_with_some_nulls(demo_archive: DiskArchive) -> None:
    served = ["PatientID", "PatientName", "PatientSex", "PatientBirthDate", "PatientAge",
              "StudyInstanceUID", "StudyDate", "StudyDescription", "SeriesInstanceUID",
              "SeriesDate", "SeriesDescription", "SeriesNumber", "Modality"]
    for series in demo_archive.series():
        ds = demo_archive.dicom_tags(series.series_instance_uid)
        assert isinstance(ds, pydicom.Dataset)
        assert "PixelData" not in ds
        assert all(ds.get(k) not in (None, "") for k in served), series
    patients = demo_archive.patients()
    assert {p.ethnic_group is None for p in patients} == {True, False}
    series = demo_archive.series()
    assert {s.body_part_examined is None for s in series} == {True, False}
    manufacturers = {s.manufacturer for s in series}
    assert None in manufacturers and '"GE Healthcare"' in manufacturers
    assert {"SIEMENS", "Siemens"} <= manufacturers
    assert all(s.manufacturer_model_name and s.software_versions for s in series
               if s.manufacturer)
    ct = next(s for s in series if s.modality == "CT")
    assert ct.pixel_spacing_row == "0.703125" and ct.slice_thickness == "2.500000"
    released = demo_archive.collections[ct.collection].date_released
    assert ct.max_submission_timestamp.date() < released


@pytest.mark.parametrize("modality", ["CT", "MR", "PT", "OT", "RTSTRUCT"])
def test_dcmdump_accepts_each_modality(demo_archive: DiskArchive, modality: str) -> None:
    path = first_file(demo_archive, modality)
    run = subprocess.run(["dcmdump", "+fo", "-dc", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "(0002,0010) UI =LittleEndianExplicit" in run.stdout
    assert f"(0008,0060) CS [{modality}]" in run.stdout


def test_modality_specifics(demo_archive: DiskArchive) -> None:
    ct = pydicom.dcmread(first_file(demo_archive, "CT"))
    assert (ct.Rows, ct.Columns, ct.pixel_array.dtype) == (512, 512, np.int16)
    assert (ct.RescaleIntercept, ct.RescaleSlope) == (-1024, 1)
    mr = pydicom.dcmread(first_file(demo_archive, "MR"))
    assert (mr.Rows, mr.pixel_array.dtype) == (256, np.uint16)
    pt = pydicom.dcmread(first_file(demo_archive, "PT"))
    assert pt.Rows == 128 and "." in str(pt.RescaleSlope) and float(pt.RescaleSlope) != 1
    mf = pydicom.dcmread(first_file(demo_archive, "OT"))
    assert mf.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.3"
    assert int(mf.NumberOfFrames) > 1 and mf.pixel_array.shape[0] == int(mf.NumberOfFrames)


def test_ct_compresses_like_real_ct(demo_archive: DiskArchive) -> None:
    data = first_file(demo_archive, "CT").read_bytes()
    ratio = len(data) / len(zlib.compress(data, 6))
    print(f"CT DEFLATE ratio (zlib 6): {ratio:.2f}")
    assert 2.0 <= ratio <= 3.0


def test_ct_geometry_is_one_volume(demo_archive: DiskArchive) -> None:
    series = next(s for s in demo_archive.series() if s.modality == "CT")
    paths = [demo_archive.path(series.series_instance_uid, r.sop_instance_uid)
             for r in demo_archive.instances(series.series_instance_uid)]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, len(headers) + 1))
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    assert {int(h.AcquisitionNumber) for h in headers} == {1}
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([np.array(h.ImagePositionPatient, dtype=float) @ normal
                          for h in headers])
    assert np.allclose(np.diff(positions), float(headers[0].SliceThickness))
    assert np.allclose([float(h.SliceLocation) for h in headers], positions)


def test_dcm2niix_makes_one_volume_per_series(demo_archive: DiskArchive,
                                              tmp_path: Path) -> None:
    for modality, matrix in (("CT", 512), ("MR", 256), ("PT", 128)):
        folder, count = series_dir(demo_archive, modality)
        out = tmp_path / modality
        out.mkdir()
        run = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), str(folder)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        volumes = list(out.glob("*.nii"))
        assert len(volumes) == 1, run.stdout
        assert nibabel.load(volumes[0]).shape == (matrix, matrix, count)


def test_rtstruct_references_the_ct_series(demo_archive: DiskArchive) -> None:
    rt_series = next(s for s in demo_archive.series() if s.modality == "RTSTRUCT")
    rt = pydicom.dcmread(first_file(demo_archive, "RTSTRUCT"))
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    ref_series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    ct = demo_archive.series_by_uid(ref_series.SeriesInstanceUID)
    assert ct is not None and ct.modality == "CT"
    assert ct.study_instance_uid == rt_series.study_instance_uid
    ct_first = demo_archive.dicom_tags(ct.series_instance_uid)
    assert frame.FrameOfReferenceUID == ct_first.FrameOfReferenceUID
    ct_sops = {r.sop_instance_uid for r in demo_archive.instances(ct.series_instance_uid)}
    contours = rt.ROIContourSequence[0].ContourSequence
    assert contours and rt.StructureSetROISequence[0].ROIName == "Nodule"
    for contour in contours:
        ref = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        assert ref in ct_sops
        z = {float(v) for v in contour.ContourData[2::3]}
        slice_z = float(pydicom.dcmread(demo_archive.path(ct.series_instance_uid, ref),
                                        stop_before_pixels=True).SliceLocation)
        assert z == {slice_z}


def test_filters_follow_nbia_rules(demo_archive: DiskArchive) -> None:
    a = demo_archive
    assert a.patients("demo-lung ct_2024") == a.patients("Demo-Lung CT_2024") != []
    assert [p.patient_id for p in a.patients("DEMO-LUNG CT_2024")] == [
        "LUNG-001", "LUNG 002", "LUNG/003"]
    assert a.series(patient_id="pétra-005") == a.series(patient_id="Pétra-005") != []
    assert a.studies(collection="NLST-Demo", patient_id="100012")[0].study_id == "T0"
    study = a.studies("NLST-Demo")[1]
    assert [s.study_instance_uid for s in a.series(study_instance_uid=study.study_instance_uid)
            ] == [study.study_instance_uid]
    assert a.series(study_instance_uid=study.study_instance_uid[:-1]) == []
    assert a.series(collection="") == [] and a.patients("nope") == []
    assert a.series() == a.series()  # stable order
    assert a.series_by_uid("1.2.3") is None and a.instances("1.2.3") == []
    assert a.instance_bytes("1.2.3", "1.2.3") is None and a.dicom_tags("1.2.3") is None
    assert list(a.iter_instance_chunks("1.2.3", "4.5")) == []
    known = a.series()[0].series_instance_uid
    assert a.instance_bytes(known, "1.2.3") is None


def test_demo_loads_fast_after_first_generation(demo_archive: DiskArchive) -> None:
    start = time.perf_counter()
    again = load_archive("demo", demo_archive.root.parent)
    elapsed = time.perf_counter() - start
    print(f"demo load from index: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0
    assert again.series() == demo_archive.series()


def test_failed_generation_leaves_nothing_that_looks_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(archive_mod, "generate_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_on_disk(tiny_profile(), tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # A temp dir abandoned by a dead generator is cleaned up by the next one.
    abandoned = tmp_path / ".tiny-tmp-999999999-x"
    abandoned.mkdir()
    root = ensure_on_disk(tiny_profile(), tmp_path)
    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]
    assert (root / "index.json").is_file()


def test_losing_a_generation_race_uses_the_winners_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = archive_mod.generate_to_disk
    winner = tmp_path / f"tiny-{fingerprint(tiny_profile())}"

    def racing(profile: Profile, root: Path) -> None:
        real(profile, root)
        winner.mkdir()  # meanwhile another process finished and published its tree
        real(profile, winner)

    monkeypatch.setattr(archive_mod, "generate_to_disk", racing)
    assert ensure_on_disk(tiny_profile(), tmp_path) == winner
    assert list(tmp_path.iterdir()) == [winner]


# ---------------------------------------------------------------------------------------
# scale and bench: on demand


def test_scale_lists_everything_without_drawing(scale_archive: GeneratedArchive) -> None:
    start = time.perf_counter()
    fresh = load_archive("scale", None)
    print(f"scale load: {(time.perf_counter() - start) * 1000:.0f} ms")
    series = scale_archive.series()
    assert len(series) >= 1000
    assert sum(s.image_count for s in series) >= 100_000
    assert len(scale_archive.collections) == 10
    assert len(scale_archive.patients()) == 100 and len(scale_archive.studies()) == 200
    for collection in scale_archive.collections:
        scale_archive.series(collection=collection)
    assert all(scale_archive.series_by_uid(s.series_instance_uid) is s for s in series)
    assert scale_archive.planes_drawn == 0
    assert isinstance(fresh, GeneratedArchive) and fresh.planes_drawn == 0


def test_scale_series_materialises_fast_and_exactly(scale_archive: GeneratedArchive) -> None:
    series = scale_archive.series()[123]
    start = time.perf_counter()
    records = scale_archive.instances(series.series_instance_uid)
    elapsed = time.perf_counter() - start
    print(f"scale instances(): {elapsed * 1000:.1f} ms")
    assert elapsed < 0.1
    assert scale_archive.planes_drawn > 0
    assert len(records) == series.image_count
    assert sum(r.size for r in records) == series.file_size
    last = records[-1]
    data = scale_archive.instance_bytes(series.series_instance_uid, last.sop_instance_uid)
    assert data is not None and hashlib.md5(data).hexdigest() == last.md5
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.pixel_array.shape == (64, 64)
    first = scale_archive.instance_bytes(series.series_instance_uid, records[0].sop_instance_uid)
    assert first is not None
    facts = scale_archive.collections[series.collection]
    read_back = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True)
    assert series_record(facts, dataset_getter(read_back), series.image_count,
                         series.file_size) == series


def test_bench_shapes_and_generation_rate() -> None:
    bench = load_archive("bench", None)
    assert isinstance(bench, GeneratedArchive)
    series = bench.series()
    counts = sorted(s.image_count for s in series)
    assert 200 in counts and counts.count(50) == 4 and max(counts) >= 2000
    assert any(90e6 <= s.file_size <= 120e6 and s.image_count != 200 for s in series)
    big = next(s for s in series if s.image_count >= 2000)
    assert 0.9e9 <= big.file_size <= 1.2e9
    assert len({s.study_instance_uid for s in series if s.image_count == 50}) == 1
    plan = bench.plan(big.series_instance_uid)
    assert plan is not None and plan.rows == 512
    start, produced = time.perf_counter(), 0
    for i in range(300):  # cold: includes drawing the series' pixel planes
        for chunk in bench.iter_instance_chunks(big.series_instance_uid, plan.sop_uid(i)):
            produced += len(chunk)
    rate = produced / (time.perf_counter() - start) / 1e6
    print(f"bench generation rate: {rate:.0f} MB/s")
    assert produced == sum(plan.size(i) for i in range(300))
    assert rate > 50
