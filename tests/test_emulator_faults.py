"""Every injected fault, seen from a plain httpx client; and the request statistics."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_emulator_support import serve_tiny, uid

from tciafs.emulator.server import EmulatorServers

V1 = "/nbia-api/services/v1/"
V4 = "/nbia-api/services/v4/"
BIG = {"SeriesInstanceUID": uid("ct-big")}  # ~600 kB of ZIP, barely compressible


@pytest.fixture(scope="module")
def servers() -> Iterator[EmulatorServers]:
    with serve_tiny() as running:
        yield running


@pytest.fixture
def client(servers: EmulatorServers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=servers.url, timeout=10) as c:
        yield c
        # Every test starts clean, whatever it left behind.
        c.post("/_emulator/faults", json={}).raise_for_status()
        c.post("/_emulator/reset").raise_for_status()


def set_faults(client: httpx.Client, **faults: object) -> dict:
    r = client.post("/_emulator/faults", json=faults)
    assert r.status_code == 200, r.text
    return r.json()


def faults_seen(client: httpx.Client) -> dict[str, int]:
    return client.get("/_emulator/stats").json()["faults"]


def test_429_with_retry_after(client: httpx.Client) -> None:
    set_faults(client, p429=1.0, retry_after=7)
    r = client.get(V4 + "getSeries")
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert faults_seen(client)["429"] == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors(client: httpx.Client, status: int) -> None:
    set_faults(client, **{f"p{status}": 1.0})
    r = client.get(V4 + "getCollectionValues")
    assert r.status_code == status
    assert faults_seen(client)[str(status)] == 1


def test_endpoint_filter_accepts_bare_and_versioned_names(client: httpx.Client) -> None:
    set_faults(client, p503=1.0, endpoints=["getImage", "v1/getSeries"])
    assert client.get(V4 + "getImage", params=BIG).status_code == 503
    assert client.get(V1 + "getSeries").status_code == 503
    assert client.get(V4 + "getSeries").status_code == 200
    assert client.get(V4 + "getSOPInstanceUIDs", params=BIG).status_code == 200


def test_reset_in_the_middle_of_a_zip(client: httpx.Client) -> None:
    set_faults(client, preset=1.0, endpoints=["getImage"])
    received = 0
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)), \
            client.stream("GET", V4 + "getImage", params=BIG) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += len(chunk)
    assert faults_seen(client)["reset"] == 1
    # The client saw the headers; the error came from the body.
    assert client.get("/_emulator/stats").json()["status"] == {"200": 1}


def test_reset_on_a_small_json_body(client: httpx.Client) -> None:
    set_faults(client, preset=1.0, endpoints=["getSeries"])
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.get(V4 + "getSeries")


def test_truncated_zip_has_status_200(client: httpx.Client) -> None:
    set_faults(client, ptruncate=1.0, endpoints=["getImage"])
    body = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), \
            client.stream("GET", V1 + "getImage", params=BIG) as r:
        assert r.status_code == 200 and "content-length" not in r.headers
        for chunk in r.iter_raw():
            body += chunk
    assert len(body) > 0
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(bytes(body)))
    assert faults_seen(client)["truncate"] == 1
    set_faults(client)
    whole = client.get(V1 + "getImage", params=BIG).content
    assert len(body) < len(whole)


def test_truncation_always_loses_the_end_of_small_bodies(client: httpx.Client) -> None:
    set_faults(client, ptruncate=1.0, endpoints=["getImage"])
    for _ in range(3):  # whatever the cut point drawn, the central directory is missing
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(V1 + "getImage", params={"SeriesInstanceUID": uid("ct-c")})


def test_a_short_zip_is_whole_and_complete_but_holds_fewer_images(
        client: httpx.Client) -> None:
    images = len(client.get(V4 + "getSOPInstanceUIDs", params=BIG).json())
    asks = (("getImage", {**BIG, "IncludeMD5": "Yes"}), ("getImageWithMD5Hash", BIG))
    whole = {name: client.get(V4 + name, params=params).content for name, params in asks}
    set_faults(client, pshort=1.0, seed=5, endpoints=["getImage", "getImageWithMD5Hash"])
    for name, params in asks:
        r = client.get(V4 + name, params=params)  # a body cut off would raise here
        assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
        with zipfile.ZipFile(io.BytesIO(r.content)) as short, \
                zipfile.ZipFile(io.BytesIO(whole[name])) as full:
            assert short.testzip() is None  # the central directory and every CRC hold
            got = short.namelist()
            kept = [n for n in got if n.endswith(".dcm")]
            assert 0 < len(kept) < images == sum(n.endswith(".dcm") for n in full.namelist())
            # The images that came are the series' first, whole; the MD5 list never came.
            assert got == full.namelist()[:len(got)] and "md5hashes.csv" not in got
            assert all(short.read(n) == full.read(n) for n in got)
    assert faults_seen(client)["short"] == 2
    set_faults(client)  # a short body was not kept for replay
    assert client.get(V4 + "getImageWithMD5Hash", params=BIG).content == whole[
        "getImageWithMD5Hash"]


def test_latency(client: httpx.Client) -> None:
    set_faults(client, latency_ms=300)
    start = time.monotonic()
    client.get(V4 + "getCollectionValues").raise_for_status()
    assert time.monotonic() - start >= 0.3


def test_bandwidth_cap_slows_a_body(client: httpx.Client) -> None:
    start = time.monotonic()
    size = len(client.get(V1 + "getImage", params=BIG).content)
    free = time.monotonic() - start
    set_faults(client, bandwidth=size)  # one body per second
    start = time.monotonic()
    assert len(client.get(V1 + "getImage", params=BIG).content) == size
    capped = time.monotonic() - start
    assert capped >= 0.9 and capped > 3 * free


def test_slow_last_byte(client: httpx.Client) -> None:
    whole = client.get(V4 + "getImage", params=BIG).content
    set_faults(client, last_byte_delay_ms=500, endpoints=["getImage"])
    received, times = bytearray(), []
    with client.stream("GET", V4 + "getImage", params=BIG) as r:
        for chunk in r.iter_raw():
            received += chunk
            times.append((len(received), time.monotonic()))
    assert bytes(received) == whole
    # Everything but the last byte, then a wait, then the last byte.
    (before, arrived), (total, last) = times[-2], times[-1]
    assert before == len(whole) - 1 and total == len(whole)
    assert last - arrived >= 0.45
    assert faults_seen(client)["slow_last_byte"] == 1
    client.get(V4 + "getSeries").raise_for_status()  # other endpoints are not slowed
    assert faults_seen(client)["slow_last_byte"] == 1


def test_slow_first_byte(client: httpx.Client) -> None:
    set_faults(client, first_byte_delay_ms=500, endpoints=["getSingleImage"])
    start = time.monotonic()
    with client.stream("GET", V4 + "getSingleImage",
                       params={**BIG, "SOPInstanceUID": uid("ct-big", 1)}) as r:
        waited = time.monotonic() - start
        assert r.status_code == 200
        r.read()
    assert waited >= 0.5
    assert faults_seen(client)["slow_first_byte"] == 1
    start = time.monotonic()
    client.get(V4 + "getSeries").raise_for_status()
    assert time.monotonic() - start < 0.4


def test_probabilities_are_seeded(client: httpx.Client) -> None:
    def run() -> list[int]:
        set_faults(client, p500=0.5, seed=42)
        return [client.get(V4 + "getCollectionValues").status_code for _ in range(24)]

    first = run()
    assert set(first) == {200, 500}
    assert run() == first


def test_fault_configuration_round_trip_and_validation(client: httpx.Client) -> None:
    assert set_faults(client, p502=0.25, endpoints=["getImage"])["p502"] == 0.25
    merged = set_faults(client, merge=True, p504=0.5)
    assert (merged["p502"], merged["p504"], merged["endpoints"]) == (0.25, 0.5, ["getImage"])
    assert client.get("/_emulator/faults").json() == merged
    assert set_faults(client)["p502"] == 0.0  # a POST replaces the whole configuration
    for bad in ({"p500": 2}, {"bogus": 1}, {"p500": 0.6, "p503": 0.6}, {"endpoints": "x"},
                {"ptruncate": 0.6, "pshort": 0.6}):
        assert client.post("/_emulator/faults", json=bad).status_code == 400
    assert client.post("/_emulator/faults", content=b"{not json").status_code == 400


def test_control_paths_are_never_faulted(client: httpx.Client) -> None:
    set_faults(client, p500=1.0, latency_ms=0)
    assert client.get("/_emulator/stats").status_code == 200
    assert client.get("/_emulator/faults").status_code == 200


def test_stats_count_requests_statuses_and_bytes(client: httpx.Client,
                                                 servers: EmulatorServers) -> None:
    client.post("/_emulator/reset")
    client.get(V4 + "getSeries", params={"PatientID": "TCL-001"})
    client.get(V1 + "getSeries")
    assert client.get("/_emulator/stats").json()["requests"].get("getImage") is None
    body = client.get(V4 + "getImage", params=BIG).content
    client.get(V4 + "getImage", params={"SeriesInstanceUID": "9.9"})
    assert servers.nlst_url
    httpx.get(servers.nlst_url + V4 + "getCollectionValues", timeout=10)
    stats = client.get("/_emulator/stats").json()
    assert stats["requests"] == {"getSeries": 2, "getImage": 2, "getCollectionValues": 1}
    assert stats["endpoints"] == {"v4/getSeries": 1, "v1/getSeries": 1, "v4/getImage": 2,
                                  "v4/getCollectionValues": 1}
    assert stats["requests_total"] == 5 and stats["status"] == {"200": 4, "400": 1}
    assert stats["bytes_sent"] > len(body)
    assert stats["servers"]["nlst"]["requests"] == {"getCollectionValues": 1}
    assert stats["servers"]["main"]["requests_total"] == 4
    cleared = client.post("/_emulator/reset").json()
    assert cleared["requests_total"] == 0 and cleared["bytes_sent"] == 0


def test_sixteen_concurrent_readers_under_random_faults(client: httpx.Client,
                                                        servers: EmulatorServers) -> None:
    """Each download either arrives whole and correct or fails visibly; nothing hangs."""
    set_faults(client, seed=3, p429=0.1, p503=0.1, preset=0.15, ptruncate=0.15,
               first_byte_delay_ms=100, pslow=0.2, endpoints=["getImage"])
    plans = ["ct-a", "ct-big", "ct-c", "mr-d", "mr-e", "seg-b"] * 3
    outcomes: list[str] = []

    def download(key: str) -> str:
        with httpx.Client(base_url=servers.url, timeout=20) as c:
            try:
                r = c.get(V4 + "getImage", params={"SeriesInstanceUID": uid(key),
                                                    "IncludeMD5": "Yes"})
            except (httpx.ReadError, httpx.RemoteProtocolError):
                return "broken"
            if r.status_code != 200:
                return str(r.status_code)
            archive = zipfile.ZipFile(io.BytesIO(r.content))
            lines = archive.read("md5hashes.csv").decode().splitlines()[1:]
            for name, digest in (line.split(",") for line in lines):
                assert hashlib.md5(archive.read(name)).hexdigest() == digest
            return "ok"

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(download, plans[:16], timeout=60))
    assert "ok" in outcomes and set(outcomes) - {"ok"}
    assert set(outcomes) <= {"ok", "broken", "429", "503"}
    set_faults(client)
    assert client.get(V4 + "getImage", params=BIG).status_code == 200  # still healthy


def test_a_replayed_body_is_cut_like_a_fresh_one(client: httpx.Client) -> None:
    whole = client.get(V1 + "getImage", params=BIG).content
    assert client.get(V1 + "getImage", params=BIG).content == whole  # from the body cache
    set_faults(client, ptruncate=1.0, endpoints=["getImage"])
    body = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), \
            client.stream("GET", V1 + "getImage", params=BIG) as r:
        for chunk in r.iter_raw():
            body += chunk
    assert 0 < len(body) < len(whole)
    set_faults(client)
    assert client.get(V1 + "getImage", params=BIG).content == whole


def _md5_list(archive: zipfile.ZipFile) -> dict[str, str]:
    lines = archive.read("md5hashes.csv").decode().splitlines()[1:]
    return dict(line.split(",") for line in lines)


def test_damaged_images_pass_every_transport_check_but_the_md5_list(
        client: httpx.Client) -> None:
    small = {"SeriesInstanceUID": uid("ct-c")}
    clean = client.get(V4 + "getImage", params={**small, "IncludeMD5": "Yes"}).content
    set_faults(client, pcorrupt=1.0, endpoints=["getImage", "getSingleImage"])
    body = client.get(V4 + "getImage", params={**small, "IncludeMD5": "Yes"}).content
    with zipfile.ZipFile(io.BytesIO(body)) as damaged, \
            zipfile.ZipFile(io.BytesIO(clean)) as truth:
        assert damaged.testzip() is None  # every CRC-32 holds
        listed = _md5_list(damaged)
        assert listed == _md5_list(truth)  # the list gives the stored hashes
        images = [n for n in damaged.namelist() if n.endswith(".dcm")]
        for name in images:
            got, want = damaged.read(name), truth.read(name)
            assert len(got) == len(want) and got[:-1] == want[:-1] and got != want
            assert hashlib.md5(got).hexdigest() != listed[name]
    sop = {**small, "SOPInstanceUID": uid("ct-c", 1)}
    single = client.get(V4 + "getSingleImage", params=sop).content
    assert faults_seen(client)["corrupt"] == len(images) + 1
    set_faults(client)  # a damaged body was not kept for replay
    assert client.get(V4 + "getImage", params={**small, "IncludeMD5": "Yes"}).content == clean
    good = client.get(V4 + "getSingleImage", params=sop).content
    assert single[:-1] == good[:-1] and single != good


def test_damage_strikes_images_at_the_given_rate(client: httpx.Client) -> None:
    set_faults(client, pcorrupt=0.5, seed=11, endpoints=["getImage"])
    body = client.get(V1 + "getImage", params=BIG).content
    first = faults_seen(client)["corrupt"]
    assert 5 <= first <= 35  # of 40 images
    set_faults(client, pcorrupt=0.5, seed=11, endpoints=["getImage"])
    assert client.get(V1 + "getImage", params=BIG).content == body  # the same images again
