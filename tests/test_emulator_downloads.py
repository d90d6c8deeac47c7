"""getImage, getImageWithMD5Hash and getSingleImage: streaming ZIPs, names and hashes."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from test_emulator_support import CT_LUNG, USERS, serve_tiny, uid

from tciafs.emulator import zipstream
from tciafs.emulator.server import EmulatorServers

V1 = "/nbia-api/services/v1/"
V2 = "/nbia-api/services/v2/"
V4 = "/nbia-api/services/v4/"
LICENSE = (f"License Information. The {CT_LUNG} collection is distributed under the CC BY 4.0 "
           "at https://creativecommons.org/licenses/by/4.0/ By downloading the data, you agree "
           "to abide by terms of this license.")


@pytest.fixture(scope="module")
def servers() -> Iterator[EmulatorServers]:
    with serve_tiny() as running:
        yield running


@pytest.fixture(scope="module")
def client(servers: EmulatorServers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=servers.url, timeout=10) as c:
        yield c


def fetch_zip(client: httpx.Client, path: str, **params: str) -> zipfile.ZipFile:
    r = client.get(path, params=params, headers={"Authorization": "Bearer undefined"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    uid_param = params["SeriesInstanceUID"]
    assert r.headers["content-disposition"] == f'attachment; filename="{uid_param}.zip"'
    return zipfile.ZipFile(io.BytesIO(r.content))


def instance_numbers(archive: zipfile.ZipFile, names: list[str]) -> list[int]:
    return [int(pydicom.dcmread(io.BytesIO(archive.read(n))).InstanceNumber) for n in names]


def test_get_image_default_layout(client: httpx.Client) -> None:
    archive = fetch_zip(client, V1 + "getImage", SeriesInstanceUID=uid("ct-a"))
    names = archive.namelist()
    assert names == ["LICENSE"] + [f"{n:08d}.dcm" for n in range(1, 13)]
    assert archive.read("LICENSE").decode() == LICENSE
    numbers = instance_numbers(archive, names[1:])
    assert sorted(numbers) == list(range(1, 13)) and numbers != sorted(numbers)
    for info in archive.infolist():  # streamed entries: DEFLATE with data descriptors
        assert info.compress_type == zipfile.ZIP_DEFLATED and info.flag_bits & 0x08
    assert archive.testzip() is None


def test_new_file_names_use_acquisition_and_variable_padding(client: httpx.Client) -> None:
    two_acquisitions = fetch_zip(client, V4 + "getImage", SeriesInstanceUID=uid("ct-a"),
                                 NewFileNames="Yes")
    names = two_acquisitions.namelist()[1:]
    assert names == [f"{a}-{i:02d}.dcm" for a in (1, 2) for i in range(1, 7)]
    assert instance_numbers(two_acquisitions, names) == list(range(1, 13))
    five = fetch_zip(client, V2 + "getImage", SeriesInstanceUID=uid("ct-c"), NewFileNames="yes")
    assert five.namelist()[1:] == [f"1-{i}.dcm" for i in range(1, 6)]
    forty = fetch_zip(client, V1 + "getImage", SeriesInstanceUID=uid("ct-big"),
                      NewFileNames="YES")
    assert forty.namelist()[1:] == [f"1-{i:02d}.dcm" for i in range(1, 41)]
    other = fetch_zip(client, V1 + "getImage", SeriesInstanceUID=uid("ct-c"), NewFileNames="No")
    assert other.namelist()[1:] == [f"{n:08d}.dcm" for n in range(1, 6)]


def check_md5_table(archive: zipfile.ZipFile) -> None:
    lines = archive.read("md5hashes.csv").decode().split("\n")
    assert lines[0] == "Filename,MD5Hash" and lines[-1] == ""
    table = dict(line.split(",") for line in lines[1:-1])
    dicom_names = [n for n in archive.namelist() if n.endswith(".dcm")]
    assert set(table) == set(dicom_names)
    for name, digest in table.items():
        assert digest == hashlib.md5(archive.read(name)).hexdigest()  # lowercase hex


def test_include_md5_is_v4_only(client: httpx.Client) -> None:
    archive = fetch_zip(client, V4 + "getImage", SeriesInstanceUID=uid("ct-a"),
                        IncludeMD5="Yes", NewFileNames="Yes")
    assert archive.namelist()[0] == "LICENSE" and archive.namelist()[-1] == "md5hashes.csv"
    check_md5_table(archive)
    v1 = fetch_zip(client, V1 + "getImage", SeriesInstanceUID=uid("ct-a"), IncludeMD5="Yes")
    assert "md5hashes.csv" not in v1.namelist()
    assert client.get(V4 + "getImage", params={"SeriesInstanceUID": uid("ct-a"),
                                                "Include": "Yes"}).status_code == 400


def test_image_with_md5_hash(client: httpx.Client) -> None:
    for version in (V1, V2, V4):
        archive = fetch_zip(client, version + "getImageWithMD5Hash",
                            SeriesInstanceUID=uid("ct-c"))
        assert archive.namelist() == [f"{n:08d}.dcm" for n in range(1, 6)] + ["md5hashes.csv"]
        check_md5_table(archive)


@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs Info-ZIP unzip")
def test_unzip_accepts_the_stream(client: httpx.Client, tmp_path: Path) -> None:
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid("ct-big"),
                                             "IncludeMD5": "Yes"})
    (tmp_path / "s.zip").write_bytes(r.content)
    result = subprocess.run(["unzip", "-t", str(tmp_path / "s.zip")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "No errors detected" in result.stdout


def test_range_is_ignored(client: httpx.Client) -> None:
    whole = client.get(V1 + "getImage", params={"SeriesInstanceUID": uid("ct-c")})
    ranged = client.get(V1 + "getImage", params={"SeriesInstanceUID": uid("ct-c")},
                        headers={"Range": "bytes=100-"})
    assert ranged.status_code == 200 and ranged.content == whole.content


def test_download_errors(client: httpx.Client) -> None:
    v1 = client.get(V1 + "getImage", params={"SeriesInstanceUID": "1.2.3"})
    assert (v1.status_code, v1.text) == (
        400, "Image with given SeriesInstanceUID,1.2.3, is not in public domain.")
    assert v1.headers["content-type"] == "application/json"
    denied = ("The user has not been granted the access to image with given SeriesInstanceUID,"
              "1.2.3. Please contact System Admin to resolve this issue.")
    for path in (V4 + "getImage", V4 + "getImageWithMD5Hash", V2 + "getImage"):
        r = client.get(path, params={"SeriesInstanceUID": "1.2.3"},
                       headers={"Authorization": "Bearer undefined"})
        assert (r.status_code, r.text) == (400, denied)
    missing = client.get(V4 + "getImage")
    assert (missing.status_code, missing.text) == (
        400, "A parameter, SeriesInstanceUID, is required for this API call.")


def test_restricted_series_needs_a_grant(client: httpx.Client) -> None:
    params = {"SeriesInstanceUID": uid("ct-f")}
    assert client.get(V4 + "getImage", params=params).status_code == 400
    token = client.post("/nbia-api/oauth/token", data={
        "grant_type": "password", "username": "alice",
        "password": USERS["alice"].password}).json()["access_token"]
    r = client.get(V4 + "getImage", params=params, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert len(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == 3


def test_single_image(client: httpx.Client) -> None:
    sop = uid("ct-a", 4)
    r = client.get(V4 + "getSingleImage",
                   params={"SeriesInstanceUID": uid("ct-a"), "SOPInstanceUID": sop})
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["content-length"] == str(len(r.content))
    assert r.headers["content-disposition"] == f"attachment; filename={sop}.dcm"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.SOPInstanceUID == sop and ds.file_meta.TransferSyntaxUID
    unknown = client.get(V1 + "getSingleImage",
                         params={"SeriesInstanceUID": uid("ct-a"), "SOPInstanceUID": "1.2"})
    assert unknown.status_code == 500 and unknown.headers["content-type"] == "text/plain"
    assert unknown.text.startswith("Server was not able to process your request\n")
    missing = client.get(V1 + "getSingleImage", params={"SeriesInstanceUID": uid("ct-a")})
    assert (missing.status_code, missing.text) == (
        400, "A parameter, SeriesInstanceUID and SOPInstanceUID, are required for this API "
             "call.")


def test_legacy_image_zip(client: httpx.Client) -> None:
    r = client.get("/services/v4/TCIA/query/getImage", params={"SeriesInstanceUID": uid("ct-c")})
    assert r.headers["transfer-encoding"] == "chunked"
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert sorted(names) == sorted(f"{uid('ct-c', n)}.dcm" for n in range(1, 6))
    single = client.get("/services/v4/TCIA/query/getSingleImage",
                        params={"SeriesInstanceUID": uid("ct-c"),
                                "SOPInstanceUID": uid("ct-c", 2)})
    assert pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID == uid("ct-c", 2)


def test_demo_profile_download(emulator) -> None:  # noqa: ANN001 (conftest fixture)
    """The real generated archive through `python -m tciafs.emulator`."""
    with httpx.Client(base_url=emulator.url, timeout=60) as c:
        series = [s for s in c.get(V4 + "getSeries").json() if s["Modality"] == "CT"]
        smallest = min(series, key=lambda s: s["FileSize"])
        r = c.get(V4 + "getImage", params={"SeriesInstanceUID": smallest["SeriesInstanceUID"],
                                            "IncludeMD5": "Yes", "NewFileNames": "Yes"})
        assert "content-length" not in r.headers
        archive = zipfile.ZipFile(io.BytesIO(r.content))
        dicom = [n for n in archive.namelist() if n.endswith(".dcm")]
        assert len(dicom) == smallest["ImageCount"]
        assert sum(archive.getinfo(n).file_size for n in dicom) == smallest["FileSize"]
        check_md5_table(archive)


# -- the body cache ---------------------------------------------------------------------------

def _counting(members: list[zipstream.ZipMember]) -> tuple[list[int], Callable]:
    calls = [0]

    def make() -> list[zipstream.ZipMember]:
        calls[0] += 1
        return members

    return calls, make


def _noisy_members() -> list[zipstream.ZipMember]:
    # Random bytes do not deflate: the body is about as large as the data.
    data = [random.Random(n).randbytes(300_000) for n in range(4)]
    return [zipstream.bytes_member(f"{n}.dcm", d) for n, d in enumerate(data)]


def test_a_body_is_made_once_then_replayed_byte_for_byte() -> None:
    cache = zipstream.BodyCache()
    calls, make = _counting(_noisy_members())
    first, second = [], []
    cache.write("k", make, first.append)
    cache.write("k", make, second.append)
    assert calls == [1]
    assert b"".join(second) == b"".join(first)
    archive = zipfile.ZipFile(io.BytesIO(b"".join(second)))
    assert archive.read("2.dcm") == random.Random(2).randbytes(300_000)
    cache.write("other", make, [].append)
    assert calls == [2]  # another key is another body


def test_a_body_cut_short_is_not_kept() -> None:
    cache = zipstream.BodyCache()
    calls, make = _counting(_noisy_members())
    sent: list[bytes] = []

    def hang_up(chunk: bytes) -> None:
        if sent:
            raise zipstream.StreamAborted("client disconnected")
        sent.append(chunk)

    with pytest.raises(zipstream.StreamAborted):
        cache.write("k", make, hang_up)
    whole: list[bytes] = []
    cache.write("k", make, whole.append)
    assert calls == [2]
    assert len(zipfile.ZipFile(io.BytesIO(b"".join(whole))).namelist()) == 4


def test_a_body_over_the_bound_is_not_kept() -> None:
    cache = zipstream.BodyCache(max_bytes=2_000_000)  # bodies up to 500 kB
    calls, make = _counting(_noisy_members())  # ~1.2 MB
    first, second = [], []
    cache.write("k", make, first.append)
    cache.write("k", make, second.append)
    assert calls == [2] and b"".join(first) == b"".join(second)


def test_each_flavour_of_a_series_is_its_own_body(client: httpx.Client) -> None:
    series = {"SeriesInstanceUID": uid("ct-c")}
    plain = client.get(V4 + "getImage", params=series).content
    named = fetch_zip(client, V4 + "getImage", NewFileNames="Yes", **series).namelist()
    hashed = fetch_zip(client, V4 + "getImage", IncludeMD5="Yes", **series).namelist()
    legacy_names = fetch_zip(client, V1 + "getImage", **series).namelist()
    assert zipfile.ZipFile(io.BytesIO(plain)).namelist() == legacy_names
    assert named != legacy_names and named[0] == "LICENSE"
    assert hashed == legacy_names + ["md5hashes.csv"]
    assert client.get(V4 + "getImage", params=series).content == plain
