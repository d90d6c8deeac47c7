"""The emulator's nlst profile: NLST's shape, drawn patient by patient from a seed.

The totals come from the generator's own per-patient function; the HTTP tests list one
collection, one patient and one series, and bound the emulator's memory after listing
2,000 patients' series (read from /proc, never timed).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tciafs.emulator import cli, launch
from tciafs.emulator.archive import load_archive
from tciafs.emulator.dicomgen import UID_ROOT
from tciafs.emulator.nlst import NlstCollection
from tciafs.emulator.patientwise import PatientwiseArchive
from tciafs.emulator.profiles import nlst

V1, V4 = "/nbia-api/services/v1", "/nbia-api/services/v4"
RSS_BOUND_KB = 150 * 1024


def _collection() -> NlstCollection:
    drawn = nlst().drawn[0]
    assert isinstance(drawn, NlstCollection)
    return drawn


@pytest.mark.unit
def test_the_collection_has_nlst_s_totals() -> None:
    coll = _collection()
    studies = series = images = 0
    counts: list[int] = []
    for index in range(coll.size):
        for study in coll.patient(index).studies:
            studies += 1
            for spec in study.series:
                series += 1
                images += spec.count
                counts.append(spec.count)
    assert coll.size == 26_410
    assert abs(studies - 73_000) <= 0.02 * 73_000
    assert abs(series - 203_000) <= 0.03 * 203_000
    assert abs(images - 21_000_000) <= 0.03 * 21_000_000
    assert min(counts) == 1 and max(counts) > 500
    # Skewed as a screening CT archive is: reconstructions of 100-300 slices dominate the
    # CT series, localizers of 1-3 images are common, past 500 there are a few.
    localizers = sum(1 for n in counts if n <= 3)
    in_100s = sum(1 for n in counts if 100 <= n <= 300)
    over_500 = sum(1 for n in counts if n > 500)
    assert in_100s > (series - localizers) / 2
    assert 0.1 * series < localizers < 0.3 * series
    assert 0 < over_500 < 0.03 * series


@pytest.mark.unit
def test_patient_ids_are_nlst_s_six_digit_numbers_and_found_back() -> None:
    coll = _collection()
    ids = [coll.patient_id(i) for i in range(coll.size)]
    assert all(len(p) == 6 and p.isdigit() for p in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] == "100001" and int(ids[-1]) > 200_000  # sparse, as the trial numbered
    for index in (0, 1, 4_321, coll.size - 1):
        assert coll.index_of(ids[index]) == index
    gap = next(i for i in range(len(ids) - 1) if int(ids[i + 1]) > int(ids[i]) + 1)
    assert coll.index_of(str(int(ids[gap]) + 1)) is None
    assert coll.index_of("99999") is None and coll.index_of("10000a") is None


@pytest.mark.unit
def test_a_patient_is_served_without_planning_the_others() -> None:
    archive = load_archive("nlst")
    assert isinstance(archive, PatientwiseArchive)
    patient = archive.patients("nlst", "100001")  # collection names are case-insensitive
    assert [p.patient_id for p in patient] == ["100001"]
    pid = archive.patients("NLST")[7_000].patient_id
    series = archive.series("NLST", pid)
    assert series and {s.patient_id for s in series} == {pid}
    assert {s.study_instance_uid for s in series} == {
        st.study_instance_uid for st in archive.studies("NLST", pid)}
    assert archive.planes_drawn == 0  # listed down to the series: nothing drawn
    # Every UID names its patient: found from the UID alone, by a fresh archive too.
    fresh = load_archive("nlst")
    record = series[-1]
    assert fresh.series_by_uid(record.series_instance_uid) == record
    instances = fresh.instances(record.series_instance_uid)
    assert len(instances) == record.image_count
    assert sum(i.size for i in instances) == record.file_size
    last = instances[-1]
    assert fresh.series_of_instance(last.sop_instance_uid) == record.series_instance_uid
    data = fresh.instance_bytes(record.series_instance_uid, last.sop_instance_uid)
    assert data is not None and len(data) == last.size
    assert hashlib.md5(data).hexdigest() == last.md5
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (ds.PatientID, ds.SeriesInstanceUID) == (pid, record.series_instance_uid)
    assert ds.pixel_array.shape == (32, 32)
    # A UID that names the patient but not one of its series is nobody's.
    parts = record.series_instance_uid.split(".")
    hashed = len(UID_ROOT.split(".")) - 1  # the component after the root
    parts[hashed] = str(int(parts[hashed]) + 1)
    assert fresh.series_by_uid(".".join(parts)) is None
    assert fresh.series_by_uid(record.series_instance_uid[:-1] + "9") is None


# --- over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launch.RunningEmulator]:
    log = tmp_path_factory.mktemp("nlst") / "emulator.log"
    emu = launch.start("--profile", "nlst", nlst=True, log=log, timeout=60)
    try:
        yield emu
    finally:
        emu.stop()


def _listings(client: httpx.Client, nlst_url: str) -> list[object]:
    """getCollectionValues, getPatient, one patient's studies and series, one series'
    size and images, in v1 and v4."""
    def get(path: str) -> object:
        reply = client.get(nlst_url + path)
        reply.raise_for_status()
        return reply.json()

    patients = get(f"{V4}/getPatient?Collection=NLST")
    assert isinstance(patients, list)
    pid = patients[12_345]["PatientId"]
    series = get(f"{V1}/getSeries?Collection=NLST&PatientID={pid}")
    assert isinstance(series, list)
    uid = series[0]["SeriesInstanceUID"]
    return [get(f"{V1}/getCollectionValues"), patients,
            get(f"{V1}/getPatientStudy?Collection=NLST&PatientID={pid}"), series,
            get(f"{V4}/getSeries?Collection=NLST&PatientID={pid}"),
            get(f"{V1}/getSeriesSize?SeriesInstanceUID={uid}"),
            get(f"{V1}/getSOPInstanceUIDs?SeriesInstanceUID={uid}"),
            get(f"{V4}/getSOPInstanceUIDs?SeriesInstanceUID={uid}")]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_nlst_server_lists_the_collection_a_patient_and_a_series(
        emulator: launch.RunningEmulator) -> None:
    assert emulator.nlst_url is not None
    with httpx.Client(timeout=60) as client:
        main = client.get(f"{emulator.url}{V1}/getCollectionValues")
        assert "NLST" not in main.text  # NLST lives on its own server, as the real one
        (collections, patients, studies, series, series_v4, size,
         uids, uids_v4) = _listings(client, emulator.nlst_url)
        image = client.get(f"{emulator.nlst_url}{V1}/getSingleImage",
                           params={"SeriesInstanceUID": series[0]["SeriesInstanceUID"],
                                   "SOPInstanceUID": uids[0]["SOPInstanceUID"]})
    assert collections == [{"Collection": "NLST"}]
    assert len(patients) == 26_410
    assert len(studies) in (1, 2, 3) and {s["StudyID"] for s in studies} <= {"T0", "T1", "T2"}
    assert sum(s["SeriesCount"] for s in studies) == len(series) == len(series_v4)
    first = series[0]
    assert size == [{"TotalSizeInBytes": first["FileSize"], "ObjectCount": first["ImageCount"]}]
    assert len(uids) == first["ImageCount"] and uids == uids_v4
    ds = pydicom.dcmread(io.BytesIO(image.content))
    assert ds.SOPInstanceUID == uids[0]["SOPInstanceUID"] and ds.Modality == "CT"


def test_listings_are_the_same_on_every_start(emulator: launch.RunningEmulator) -> None:
    assert emulator.nlst_url is not None
    with httpx.Client(timeout=60) as client:
        first = _listings(client, emulator.nlst_url)
        with launch.start("--profile", "nlst", nlst=True, timeout=60) as again:
            assert again.nlst_url is not None
            assert _listings(client, again.nlst_url) == first


def test_memory_stays_bounded_while_2000_patients_are_listed(
        emulator: launch.RunningEmulator) -> None:
    assert emulator.nlst_url is not None
    url = f"{emulator.nlst_url}{V1}/getSeries"
    with httpx.Client(timeout=60) as client:
        patients = client.get(f"{emulator.nlst_url}{V4}/getPatient?Collection=NLST").json()
        for patient in patients[:2_000]:
            reply = client.get(url, params={"Collection": "NLST",
                                            "PatientID": patient["PatientId"]})
            assert reply.json()
    assert _rss_kb(emulator.proc.pid) < RSS_BOUND_KB


def test_every_generation_serves_a_patient_and_its_smallest_series(
        emulator: launch.RunningEmulator) -> None:
    assert emulator.nlst_url is not None
    base, pid = emulator.nlst_url, "100001"
    params = {"Collection": "NLST", "PatientID": pid}
    with httpx.Client(timeout=60) as client:
        lists = [client.get(f"{base}{root}/getSeries", params=params).json()
                 for root in (V1, V4, "/services/v4/TCIA/query")]
        assert len({len(found) for found in lists}) == 1
        smallest = min(lists[0], key=lambda s: s["ImageCount"])
        uid = smallest["SeriesInstanceUID"]
        body = client.get(f"{base}{V1}/getImage", params={"SeriesInstanceUID": uid}).content
        sops = client.get(f"{base}/services/v4/TCIA/query/getSOPInstanceUIDs",
                          params={"SeriesInstanceUID": uid}).json()
        sop = sops[-1]["SOPInstanceUID"]
        image = client.get(f"{base}{V4}/getSingleImage",
                           params={"SeriesInstanceUID": uid, "SOPInstanceUID": sop}).content
        md5 = client.get(f"{base}{V1}/getM5HashForImage", params={"SOPInstanceUid": sop}).text
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        images = [n for n in archive.namelist() if n.endswith(".dcm")]
        assert len(images) == smallest["ImageCount"] == len(sops)
        assert sum(archive.getinfo(n).file_size for n in images) == smallest["FileSize"]
    assert hashlib.md5(image).hexdigest() == md5


@pytest.mark.unit
def test_the_profile_refuses_an_idc_side(capsys: pytest.CaptureFixture[str]) -> None:
    # Its S3 side would list every series of the collection at start.
    assert cli.main(["--profile", "nlst", "--s3-port", "0"]) == 2
    assert "no IDC side" in capsys.readouterr().err


def test_the_shared_carts_name_the_first_patient_s_series(
        emulator: launch.RunningEmulator) -> None:
    base = f"{emulator.nlst_url}{V1}"
    with httpx.Client(timeout=60) as client:
        first = client.get(f"{base}/getSeries",
                           params={"Collection": "NLST", "PatientID": "100001"}).json()
        demo = client.get(f"{base}/getContentsByName", params={"name": "nbia-demo-cart"})
        patient = client.get(f"{base}/getContentsByName",
                             params={"name": "nbia-first-patient-cart"})
    assert [s["SeriesInstanceUID"] for s in demo.json()] == [first[0]["SeriesInstanceUID"]]
    assert ([s["SeriesInstanceUID"] for s in patient.json()]
            == [s["SeriesInstanceUID"] for s in first])
    assert _rss_kb(emulator.proc.pid) < RSS_BOUND_KB  # no collection was listed whole
