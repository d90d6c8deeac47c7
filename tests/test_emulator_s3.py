"""The emulator's S3 side on the demo archive, seen from a plain httpx client: which
series the buckets hold, the ListObjectsV2 XML and its paging, ranges, HEAD, S3's
errors, virtual-host addressing, the statistics, the catalog and the launcher."""

from __future__ import annotations

import hashlib
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pydicom
import pytest

from tciafs.emulator import launch
from tciafs.emulator.archive import DiskArchive, load_archive
from tciafs.emulator.server import EmulatorServers, Options

NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
BUCKETS = ("idc-open-data", "idc-open-data-two", "idc-open-data-cr")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
KEY = re.compile(rf"({UUID})/({UUID})\.dcm")


@pytest.fixture(scope="module")
def archive(demo_data_dir: Path) -> DiskArchive:
    loaded = load_archive("demo", demo_data_dir)
    assert isinstance(loaded, DiskArchive)
    return loaded


@pytest.fixture(scope="module")
def servers(archive: DiskArchive) -> Iterator[EmulatorServers]:
    with EmulatorServers(archive, Options(s3_port=0)) as running:
        yield running


@pytest.fixture
def s3(servers: EmulatorServers) -> Iterator[httpx.Client]:
    assert servers.s3_url is not None
    with httpx.Client(base_url=servers.s3_url, timeout=10) as client:
        yield client
        client.post("/_emulator/faults", json={}).raise_for_status()
        client.post("/_emulator/reset").raise_for_status()


def listing(s3: httpx.Client, bucket: str, **params: str) -> ET.Element:
    r = s3.get(f"/{bucket}", params={"list-type": "2", **params})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/xml"
    return ET.fromstring(r.content)


def keys_of(page: ET.Element) -> list[str]:
    return [k.text or "" for k in page.findall("s3:Contents/s3:Key", NS)]


def every_key(s3: httpx.Client, bucket: str, **params: str) -> list[str]:
    keys: list[str] = []
    token: str | None = None
    while True:
        page = listing(s3, bucket, **params, **({"continuation-token": token} if token else {}))
        keys += keys_of(page)
        if page.findtext("s3:IsTruncated", namespaces=NS) == "false":
            assert page.find("s3:NextContinuationToken", NS) is None
            return keys
        token = page.findtext("s3:NextContinuationToken", namespaces=NS)
        assert token


def s3_error(r: httpx.Response, status: int, code: str) -> ET.Element:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/xml"
    doc = ET.fromstring(r.content)
    assert doc.tag == "Error" and doc.findtext("Code") == code
    assert doc.findtext("Message") and doc.findtext("RequestId")
    assert r.headers["x-amz-request-id"] == doc.findtext("RequestId")
    return doc


def series_keys(s3: httpx.Client) -> dict[str, list[str]]:
    """Every bucket's keys by bucket."""
    return {bucket: every_key(s3, bucket) for bucket in BUCKETS}


def sop_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_objects_are_the_archives_instances_under_uuid_keys(
        s3: httpx.Client, archive: DiskArchive) -> None:
    keys = every_key(s3, "idc-open-data")
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(KEY.fullmatch(k) for k in keys)
    page = listing(s3, "idc-open-data", prefix=keys[0].split("/")[0] + "/")
    entry = page.find("s3:Contents", NS)
    assert entry is not None
    data = s3.get(f"/idc-open-data/{keys[0]}").content
    assert entry.findtext("s3:Size", namespaces=NS) == str(len(data))
    assert entry.findtext("s3:ETag", namespaces=NS) == f'"{hashlib.md5(data).hexdigest()}"'
    assert entry.findtext("s3:StorageClass", namespaces=NS) == "STANDARD"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z",
                        entry.findtext("s3:LastModified", namespaces=NS) or "")
    sop = sop_of(data)
    series = next(s for s in archive.series() if any(
        i.sop_instance_uid == sop for i in archive.instances(s.series_instance_uid)))
    assert archive.instance_bytes(series.series_instance_uid, sop) == data


def test_keys_are_stable_across_servers(s3: httpx.Client, archive: DiskArchive) -> None:
    with EmulatorServers(archive, Options(s3_port=0)) as other:
        assert other.s3_url is not None
        with httpx.Client(base_url=other.s3_url, timeout=10) as again:
            assert series_keys(again) == series_keys(s3)


def test_which_series_each_archive_holds(s3: httpx.Client, servers: EmulatorServers,
                                         archive: DiskArchive) -> None:
    in_buckets: dict[str, str] = {}  # SeriesInstanceUID -> bucket
    descriptions: dict[str, str] = {}
    studies: dict[str, str] = {}
    for bucket, keys in series_keys(s3).items():
        for prefix in sorted({k.split("/")[0] for k in keys}):
            first = next(k for k in keys if k.startswith(prefix))
            ds = pydicom.dcmread(io.BytesIO(s3.get(f"/{bucket}/{first}").content),
                                 stop_before_pixels=True)
            in_buckets[str(ds.SeriesInstanceUID)] = bucket
            descriptions[str(ds.SeriesInstanceUID)] = str(ds.get("SeriesDescription", ""))
            studies[str(ds.SeriesInstanceUID)] = str(ds.StudyInstanceUID)
    nbia = {s.series_instance_uid: s for s in archive.series()}
    # Only in NBIA: two series named by the profile, and the restricted collection.
    missing = {nbia[uid].series_description for uid in set(nbia) - set(in_buckets)}
    assert missing == {"Biopsy guidance", "Screen Save", "t2_tse_tra"}
    # Only in IDC: an analysis result in a study NBIA has, and a collection of its own.
    extra = {descriptions[uid] for uid in set(in_buckets) - set(nbia)}
    assert extra == {"AI nodule contours", "Supine 1.25mm"}
    ai = next(uid for uid, text in descriptions.items() if text == "AI nodule contours")
    assert studies[ai] in {s.study_instance_uid for s in nbia.values()
                           if s.patient_id == "LUNG-001"}
    assert {in_buckets[uid] for uid, s in nbia.items()
            if s.collection == "Demo MR-Brain_2023" and uid in in_buckets} \
        == {"idc-open-data-two"}
    assert {in_buckets[uid] for uid, s in nbia.items()
            if s.collection == "NLST-Demo"} == {"idc-open-data"}
    assert {b for uid, b in in_buckets.items() if descriptions[uid] == "Supine 1.25mm"} \
        == {"idc-open-data-cr"}
    # The NBIA side lists none of them.
    with httpx.Client(base_url=servers.url, timeout=10) as nbia_client:
        names = [row["Collection"] for row in
                 nbia_client.get("/nbia-api/services/v4/getCollectionValues").json()]
        assert "Demo-IDC Only_Colon CT" not in names
        rows = nbia_client.get("/nbia-api/services/v4/getSeries",
                               params={"Collection": "Demo-Lung CT_2024"}).json()
        assert "AI nodule contours" not in {r.get("SeriesDescription") for r in rows}


def test_listing_xml_and_paging(s3: httpx.Client) -> None:
    everything = every_key(s3, "idc-open-data")
    first = listing(s3, "idc-open-data", **{"max-keys": "7"})
    assert first.tag == "{http://s3.amazonaws.com/doc/2006-03-01/}ListBucketResult"
    assert first.findtext("s3:Name", namespaces=NS) == "idc-open-data"
    assert first.findtext("s3:Prefix", namespaces=NS) == ""
    assert first.findtext("s3:KeyCount", namespaces=NS) == "7"
    assert first.findtext("s3:MaxKeys", namespaces=NS) == "7"
    assert first.findtext("s3:IsTruncated", namespaces=NS) == "true"
    assert every_key(s3, "idc-open-data", **{"max-keys": "7"}) == everything
    assert len(everything) > 7
    # Pages of 1,000 at most, whatever is asked.
    big = listing(s3, "idc-open-data", **{"max-keys": "5000"})
    assert big.findtext("s3:MaxKeys", namespaces=NS) == "1000"
    after = listing(s3, "idc-open-data", **{"start-after": everything[9]})
    assert keys_of(after) == everything[10:]
    assert after.findtext("s3:StartAfter", namespaces=NS) == everything[9]


def test_delimiter_gives_one_common_prefix_per_series(s3: httpx.Client) -> None:
    everything = every_key(s3, "idc-open-data")
    page = listing(s3, "idc-open-data", delimiter="/")
    prefixes = [p.text for p in page.findall("s3:CommonPrefixes/s3:Prefix", NS)]
    assert prefixes == sorted({k.split("/")[0] + "/" for k in everything})
    assert keys_of(page) == []
    assert page.findtext("s3:KeyCount", namespaces=NS) == str(len(prefixes))
    paged: list[str] = []
    token = None
    while True:
        params = {"delimiter": "/", "max-keys": "2", **({"continuation-token": token}
                                                        if token else {})}
        part = listing(s3, "idc-open-data", **params)
        paged += [p.text or "" for p in part.findall("s3:CommonPrefixes/s3:Prefix", NS)]
        token = part.findtext("s3:NextContinuationToken", namespaces=NS)
        if token is None:
            break
    assert paged == prefixes


def test_a_prefix_lists_one_series(s3: httpx.Client) -> None:
    everything = every_key(s3, "idc-open-data")
    prefix = everything[0].split("/")[0] + "/"
    assert every_key(s3, "idc-open-data", prefix=prefix) == \
        [k for k in everything if k.startswith(prefix)]
    assert every_key(s3, "idc-open-data", prefix="no-such-prefix/") == []


@pytest.mark.parametrize(("header", "first", "last"), [
    ("bytes=0-99", 0, 99), ("bytes=100-", 100, None), ("bytes=-50", -50, None),
    ("bytes=10-99999999", 10, None),
])
def test_ranges(s3: httpx.Client, header: str, first: int, last: int | None) -> None:
    key = every_key(s3, "idc-open-data")[0]
    whole = s3.get(f"/idc-open-data/{key}")
    assert whole.status_code == 200 and "content-range" not in whole.headers
    size = len(whole.content)
    r = s3.get(f"/idc-open-data/{key}", headers={"Range": header})
    assert r.status_code == 206
    start = first % size
    end = size - 1 if last is None else last
    assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
    assert r.content == whole.content[start:end + 1]
    assert int(r.headers["content-length"]) == end - start + 1


def test_unsatisfiable_and_ignored_ranges(s3: httpx.Client) -> None:
    key = every_key(s3, "idc-open-data")[0]
    size = int(s3.head(f"/idc-open-data/{key}").headers["content-length"])
    r = s3.get(f"/idc-open-data/{key}", headers={"Range": f"bytes={size}-"})
    doc = s3_error(r, 416, "InvalidRange")
    assert doc.findtext("ActualObjectSize") == str(size)
    assert r.headers["content-range"] == f"bytes */{size}"
    # Several ranges, or nonsense: the whole object.
    for header in ("bytes=0-1,5-9", "bytes=9-2", "items=0-9"):
        r = s3.get(f"/idc-open-data/{key}", headers={"Range": header})
        assert r.status_code == 200 and len(r.content) == size


def test_head(s3: httpx.Client) -> None:
    key = every_key(s3, "idc-open-data")[0]
    body = s3.get(f"/idc-open-data/{key}").content
    r = s3.head(f"/idc-open-data/{key}")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["etag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["last-modified"].endswith(" GMT")
    ranged = s3.head(f"/idc-open-data/{key}", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.headers["content-length"] == "10"
    assert s3.head(f"/idc-open-data/{key[:-5]}x.dcm").status_code == 404


def test_errors(s3: httpx.Client) -> None:
    key = every_key(s3, "idc-open-data")[0]
    doc = s3_error(s3.get(f"/idc-open-data/{key[:-5]}x.dcm"), 404, "NoSuchKey")
    assert doc.findtext("Key") == f"{key[:-5]}x.dcm"
    doc = s3_error(s3.get("/no-such-bucket", params={"list-type": "2"}), 404, "NoSuchBucket")
    assert doc.findtext("BucketName") == "no-such-bucket"
    s3_error(s3.get("/no-such-bucket/a/b.dcm"), 404, "NoSuchBucket")
    s3_error(s3.put(f"/idc-open-data/{key}", content=b"x"), 403, "AccessDenied")
    s3_error(s3.delete(f"/idc-open-data/{key}"), 403, "AccessDenied")
    s3_error(s3.post("/idc-open-data/x", content=b"x"), 403, "AccessDenied")
    s3_error(s3.get("/"), 403, "AccessDenied")
    s3_error(s3.get("/idc-open-data"), 501, "NotImplemented")
    s3_error(s3.get("/idc-open-data", params={"list-type": "2", "continuation-token": "%%"}),
             400, "InvalidArgument")
    s3_error(s3.get("/idc-open-data", params={"list-type": "2", "max-keys": "-1"}),
             400, "InvalidArgument")


def test_virtual_host_addressing(s3: httpx.Client) -> None:
    key = every_key(s3, "idc-open-data-two")[0]
    host = {"Host": "idc-open-data-two.s3.localhost"}
    page = ET.fromstring(s3.get("/", params={"list-type": "2"}, headers=host).content)
    assert page.findtext("s3:Name", namespaces=NS) == "idc-open-data-two"
    assert keys_of(page)[0] == key
    assert s3.get(f"/{key}", headers=host).content == s3.get(f"/idc-open-data-two/{key}").content


def test_slow_down_and_stats(s3: httpx.Client) -> None:
    key = every_key(s3, "idc-open-data")[0]
    s3.post("/_emulator/reset").raise_for_status()
    s3.post("/_emulator/faults", json={"p503": 1.0, "endpoints": ["GetObject"]})
    s3_error(s3.get(f"/idc-open-data/{key}"), 503, "SlowDown")
    assert listing(s3, "idc-open-data") is not None  # ListObjectsV2 is not filtered in
    s3.post("/_emulator/faults", json={"p500": 1.0, "endpoints": ["s3/HeadObject"]})
    assert s3.head(f"/idc-open-data/{key}").status_code == 500
    stats = s3.get("/_emulator/stats").json()
    counts = stats["servers"]["s3"]
    assert counts["requests"] == {"GetObject": 1, "ListObjectsV2": 1, "HeadObject": 1}
    assert counts["endpoints"]["s3/GetObject"] == 1
    assert counts["faults"]["503"] == 1 and counts["faults"]["500"] == 1
    assert stats["servers"]["main"]["requests_total"] == 0


def test_the_catalog(s3: httpx.Client) -> None:
    everything = {b: every_key(s3, b) for b in BUCKETS}
    r = s3.get("/_emulator/idc/idc_index.parquet")
    assert r.status_code == 200
    index = pq.read_table(io.BytesIO(r.content)).to_pylist()
    prefixes = {(b, k.split("/")[0]) for b, keys in everything.items() for k in keys}
    assert {(row["aws_bucket"], row["crdc_series_uuid"]) for row in index} == prefixes
    for row in index:
        assert row["series_aws_url"] == f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/*"
        keys = [k for k in everything[row["aws_bucket"]]
                if k.startswith(row["crdc_series_uuid"] + "/")]
        assert row["instanceCount"] == len(keys)
    ai = [row for row in index if row["SeriesDescription"] == "AI nodule contours"]
    assert [row["analysis_result_id"] for row in ai] == ["demo_lung_ai_nodules"]
    assert ai[0]["collection_id"] == "demo_lung_ct_2024"
    collections = pq.read_table(io.BytesIO(
        s3.get("/_emulator/idc/collections_index.parquet").content)).to_pylist()
    lung = next(c for c in collections if c["collection_name"] == "Demo-Lung CT_2024")
    assert lung["collection_id"] == "demo_lung_ct_2024"
    assert len(lung["sources"]) == 2  # the collection and its analysis result
    assert s3.get("/_emulator/idc/nothing.parquet").status_code == 404


# The real catalog's columns and types, as idc-index-data 25.0.5's files have them.
_TEXT, _INT = "large_string", "int64"
REAL_INDEX = [
    ("collection_id", _TEXT), ("analysis_result_id", _TEXT), ("PatientID", _TEXT),
    ("SeriesInstanceUID", _TEXT), ("StudyInstanceUID", _TEXT), ("source_DOI", _TEXT),
    ("PatientAge", _TEXT), ("PatientSex", _TEXT), ("StudyDate", _TEXT),
    ("StudyDescription", _TEXT), ("BodyPartExamined", _TEXT), ("Modality", _TEXT),
    ("SOPClassUID", _TEXT), ("sop_class_name", _TEXT), ("TransferSyntaxUID", _TEXT),
    ("transfer_syntax_name", _TEXT), ("PhotometricInterpretation", _TEXT),
    ("PixelRepresentation", _TEXT), ("Manufacturer", _TEXT), ("ManufacturerModelName", _TEXT),
    ("SeriesDate", _TEXT), ("SeriesDescription", _TEXT), ("SeriesNumber", _TEXT),
    ("instanceCount", _INT), ("license_short_name", _TEXT), ("series_init_idc_version", _INT),
    ("series_revised_idc_version", _INT), ("aws_bucket", _TEXT), ("crdc_series_uuid", _TEXT),
    ("series_aws_url", _TEXT), ("series_size_MB", "double"),
]
REAL_SOURCES = (
    "list<element: struct<source_id: string, source_title: string, source_type: string, "
    "source_doi: string, source_url: string, modalities: string, license: "
    "struct<license_url: string, license_long_name: string, license_short_name: string>, "
    "citation: string, provenance: struct<data_contributor: string, source_data_provider: "
    "string, deidentification_party: string, dicom_conversion_by: string>, Access: string, "
    "ImageTypes: string>>")
REAL_COLLECTIONS = [
    ("collection_name", _TEXT), ("collection_id", _TEXT), ("cancer_types", _TEXT),
    ("tumor_locations", _TEXT), ("subjects", _INT), ("species", _TEXT),
    ("sources", REAL_SOURCES), ("supporting_data", _TEXT), ("program_id", _TEXT),
    ("status", _TEXT), ("updated", _TEXT), ("description", _TEXT),
]


@pytest.mark.parametrize(("name", "columns"), [("idc_index.parquet", REAL_INDEX),
                                               ("collections_index.parquet", REAL_COLLECTIONS)])
def test_the_catalog_has_the_real_schema(s3: httpx.Client, name: str,
                                         columns: list[tuple[str, str]]) -> None:
    schema = pq.read_schema(io.BytesIO(s3.get(f"/_emulator/idc/{name}").content))
    assert [(n, str(t)) for n, t in zip(schema.names, schema.types, strict=True)] == columns
    assert schema.metadata[b"idc_index_data_version"].endswith(b"+tciafs.emulator")


def test_catalog_values_read_as_the_real_ones(s3: httpx.Client, archive: DiskArchive) -> None:
    index = pq.read_table(io.BytesIO(s3.get("/_emulator/idc/idc_index.parquet").content))
    rows = {row["SeriesInstanceUID"]: row for row in index.to_pylist()}
    ct = next(s for s in archive.series() if s.series_description == "Axial 2.5mm STD")
    row = rows[ct.series_instance_uid]
    assert row["StudyDate"] == "2019-06-03" and row["SeriesDate"] == "2019-06-03"
    assert row["SeriesNumber"] == "2" and row["Modality"] == "CT"
    assert row["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert row["sop_class_name"] == "CT Image Storage"
    assert row["transfer_syntax_name"] == "Explicit VR Little Endian"
    assert row["source_DOI"] == "10.7937/tciafs.demo.lungct2024"
    assert row["analysis_result_id"] is None and row["license_short_name"] == "CC BY 4.0"
    assert row["series_size_MB"] == ct.file_size / 1e6
    assert row["instanceCount"] == 40 and row["PatientID"] == "LUNG-001"


def test_without_pyarrow_the_catalog_says_why(s3: httpx.Client,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tciafs.emulator import idccatalog

    monkeypatch.setattr(idccatalog, "pyarrow_missing", lambda: idccatalog.NEEDS_PYARROW)
    r = s3.get("/_emulator/idc/idc_index.parquet")
    assert r.status_code == 501 and "pip install 'tciafs[idc]'" in r.text
    assert listing(s3, "idc-open-data").findtext("s3:Name", namespaces=NS) == "idc-open-data"


def test_the_launcher_reports_the_s3_endpoint(demo_data_dir: Path) -> None:
    with launch.start("--profile", "demo", data_dir=demo_data_dir, nlst=True,
                      s3=True) as emu:
        assert emu.s3_url and emu.nlst_url and emu.s3_url not in (emu.url, emu.nlst_url)
        with httpx.Client(base_url=emu.s3_url, timeout=10) as client:
            assert listing(client, "idc-open-data").findtext(
                "s3:Name", namespaces=NS) == "idc-open-data"
