"""The S3 client (tciafs.sources.idc.s3) against two real S3 servers on loopback: moto's,
an S3 implementation of its own, and the emulator's; then against the emulator's faults,
and against hostile answers of a scripted server.

Both servers hold the same objects: the emulator's holdings of a small generated
archive (one series of 1,001 instances, past one listing page, and one of 3), put into
moto's bucket byte for byte. So the same assertions hold for both, and a reading of S3
that only our own emulator shares would fail against moto.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from moto.server import ThreadedMotoServer

from tciafs.backoff import Backoff
from tciafs.emulator.archive import GeneratedArchive
from tciafs.emulator.dicomgen import Kind, PatientSpec, SeriesSpec, StudySpec
from tciafs.emulator.model import CollectionFacts
from tciafs.emulator.profiles import CC_BY_4, CollectionSpec, Profile
from tciafs.emulator.server import EmulatorServers, Options
from tciafs.sources.base import MalformedResponse, NotFound, ServerError, TruncatedStream
from tciafs.sources.idc import RangeNotSatisfiable, RetryPolicy, S3Client

from scripted_server import ScriptedServer

BUCKET = "idc-open-data"
QUICK = RetryPolicy(retries=5, backoff=Backoff(base=0.001, cap=0.01, jitter=1.0), deadline=30)
Objects = dict[str, bytes]  # key -> bytes, in key order


def conformance_archive() -> GeneratedArchive:
    facts = CollectionFacts(
        name="S3-Conformance", **CC_BY_4, doi="https://doi.org/10.0000/S3",
        date_released=dt.date(2025, 1, 1), site="Test", description="Keys past a page.")
    # 16x16 images, one plane drawn per series: 1,001 files cost next to nothing.
    patient = PatientSpec("S3-001", "F", dt.date(1970, 1, 1), studies=(
        StudySpec(dt.date(2024, 1, 1), "MANY", "1", series=(
            SeriesSpec(Kind.CT, 1001, "Many small", number=1, matrix=16, distinct_planes=1),
            SeriesSpec(Kind.MR, 3, "Three", number=2, matrix=16, distinct_planes=1),
        )),
    ))
    return GeneratedArchive(Profile("s3-conformance", seed=11, on_disk=False,
                                    collections=(CollectionSpec(facts, (patient,)),)))


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServers]:
    with EmulatorServers(conformance_archive(), Options(s3_port=0)) as servers:
        yield servers


@pytest.fixture(scope="module")
def objects(emulator: EmulatorServers) -> Objects:
    """What the emulator's bucket holds, read from the emulator's own records."""
    assert emulator.s3 is not None
    holdings = emulator.s3.holdings
    found: Objects = {}
    for series in holdings.series_in(BUCKET):
        for obj in holdings.objects(series):
            data = series.archive.instance_bytes(series.record.series_instance_uid,
                                                 obj.sop_instance_uid)
            assert data is not None
            found[obj.key] = data
    assert len(found) == 1004
    return dict(sorted(found.items()))


@pytest.fixture(scope="module")
def emulator_endpoint(emulator: EmulatorServers) -> str:
    assert emulator.s3_url is not None
    return emulator.s3_url


@pytest.fixture(scope="module")
def moto_endpoint(objects: Objects) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        # Plain PUTs: moto takes requests without a signature, and no AWS settings of the
        # machine are read. Public reading is granted as IDC's buckets grant it: like S3,
        # moto refuses an anonymous reader (AccessDenied) what is not public-read.
        public = {"x-amz-acl": "public-read"}
        with httpx.Client(base_url=url, timeout=30, headers=public) as client:
            client.put(f"/{BUCKET}").raise_for_status()
            for key, data in objects.items():
                client.put(f"/{BUCKET}/{key}", content=data).raise_for_status()
        yield url
    finally:
        server.stop()


@pytest.fixture(params=["moto", "emulator"])
def endpoint(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_endpoint")
    return url


@pytest.fixture
async def client(endpoint: str) -> AsyncIterator[S3Client]:
    async with S3Client(endpoint, policy=QUICK) as s3:
        yield s3


def prefixes(objects: Objects) -> list[str]:
    return sorted({key.split("/")[0] + "/" for key in objects})


def big_prefix(objects: Objects) -> str:
    return max(prefixes(objects), key=lambda p: sum(k.startswith(p) for k in objects))


# --- the same on both servers ------------------------------------------------------------

async def test_a_listing_past_one_page(client: S3Client, objects: Objects) -> None:
    prefix = big_prefix(objects)
    expected = {k: len(v) for k, v in objects.items() if k.startswith(prefix)}
    assert len(expected) == 1001
    first = await client.list_page(BUCKET, prefix)
    assert len(first.objects) == 1000 and first.next_token is not None
    second = await client.list_page(BUCKET, prefix, token=first.next_token)
    assert len(second.objects) == 1 and second.next_token is None
    listed = await client.list_objects(BUCKET, prefix)
    assert [(o.key, o.size) for o in listed] == list(expected.items())
    assert all(o.md5 == hashlib.md5(objects[o.key]).hexdigest() for o in listed[:20])


async def test_small_pages(client: S3Client, objects: Objects) -> None:
    listed = await client.list_objects(BUCKET, "", max_keys=300)
    assert [o.key for o in listed] == list(objects)
    assert client.stats.requests["ListObjectsV2"] == 4
    after = await client.list_page(BUCKET, "", start_after=list(objects)[9], max_keys=5)
    assert [o.key for o in after.objects] == list(objects)[10:15]


async def test_common_prefixes(client: S3Client, objects: Objects) -> None:
    page = await client.list_page(BUCKET, "", delimiter="/")
    assert page.prefixes == prefixes(objects) and page.objects == []
    assert await client.list_objects(BUCKET, "no-such-prefix/") == []


async def test_head(client: S3Client, objects: Objects) -> None:
    key, data = next(iter(objects.items()))
    head = await client.head(BUCKET, key)
    assert head.size == len(data) and head.etag == hashlib.md5(data).hexdigest()
    assert head.last_modified


async def test_whole_and_ranged_reads(client: S3Client, objects: Objects) -> None:
    key, data = list(objects.items())[-1]
    size = len(data)
    assert await client.read(BUCKET, key) == data
    assert await client.read(BUCKET, key, (0, 132)) == data[:132]
    assert await client.read(BUCKET, key, (100, size)) == data[100:]
    assert await client.read(BUCKET, key, (size - 10, size + 1000)) == data[-10:]
    async with client.open(BUCKET, key, (5, 25)) as stream:
        assert stream.size == 20 and stream.object_size == size
        assert b"".join([c async for c in stream.chunks()]) == data[5:25]
    assert client.stats.resumes == 0


async def test_what_is_not_there(client: S3Client, objects: Objects) -> None:
    key, data = next(iter(objects.items()))
    missing = key[:-5] + "0.dcm" if not key.endswith("0.dcm") else key[:-5] + "1.dcm"
    with pytest.raises(NotFound, match="NoSuchKey"):
        await client.read(BUCKET, missing)
    with pytest.raises(NotFound):
        await client.head(BUCKET, missing)
    with pytest.raises(NotFound, match="NoSuchBucket"):
        await client.list_page("no-such-bucket-here", "")
    with pytest.raises(RangeNotSatisfiable, match="InvalidRange"):
        await client.read(BUCKET, key, (len(data), len(data) + 10))


# --- the emulator's faults ---------------------------------------------------------------

@pytest.fixture
async def faulty(emulator: EmulatorServers) -> AsyncIterator[S3Client]:
    """A client of the emulator whose faults and counts are cleared after the test."""
    assert emulator.s3_url is not None
    async with S3Client(emulator.s3_url, policy=QUICK) as s3:
        yield s3
    emulator.faults.update({})
    emulator.stats.reset()


def set_faults(emulator: EmulatorServers, **config: object) -> None:
    emulator.stats.reset()
    emulator.faults.update(config)


def injected(emulator: EmulatorServers, kind: str) -> int:
    faults: dict[str, int] = emulator.stats.snapshot()["faults"]  # type: ignore[assignment]
    return faults[kind]


async def test_slow_down_is_retried(faulty: S3Client, emulator: EmulatorServers,
                                    objects: Objects) -> None:
    set_faults(emulator, p503=0.3, seed=3)
    sample = list(objects.items())[:12]
    for key, data in sample:
        assert await faulty.read(BUCKET, key, (0, 64)) == data[:64]
        assert (await faulty.head(BUCKET, key)).size == len(data)
    assert len(await faulty.list_objects(BUCKET, "", max_keys=500)) == len(objects)
    assert injected(emulator, "503") >= 1
    assert faulty.stats.retries == injected(emulator, "503")


async def test_slow_down_that_lasts_is_a_server_error(faulty: S3Client,
                                                      emulator: EmulatorServers,
                                                      objects: Objects) -> None:
    set_faults(emulator, p503=1.0, endpoints=["GetObject"])
    key = next(iter(objects))
    with pytest.raises(ServerError, match="SlowDown") as caught:
        await faulty.read(BUCKET, key)
    assert caught.value.status == 503
    assert injected(emulator, "503") == QUICK.retries + 1


async def test_a_reset_mid_body_is_resumed(faulty: S3Client, emulator: EmulatorServers,
                                           objects: Objects) -> None:
    set_faults(emulator, preset=0.3, seed=5, endpoints=["GetObject"])
    for key, data in list(objects.items())[-12:]:
        assert await faulty.read(BUCKET, key) == data
        assert await faulty.read(BUCKET, key, (7, len(data) - 7)) == data[7:-7]
    assert injected(emulator, "reset") >= 1
    assert faulty.stats.resumes == injected(emulator, "reset")


async def test_resets_that_last_are_a_truncated_stream(faulty: S3Client,
                                                       emulator: EmulatorServers,
                                                       objects: Objects) -> None:
    set_faults(emulator, preset=1.0, endpoints=["GetObject"])
    with pytest.raises(TruncatedStream, match="cut short"):
        await faulty.read(BUCKET, next(iter(objects)))
    assert faulty.stats.resumes == QUICK.retries


async def test_a_listing_cut_mid_body_is_asked_again(faulty: S3Client,
                                                     emulator: EmulatorServers,
                                                     objects: Objects) -> None:
    set_faults(emulator, preset=0.3, ptruncate=0.3, seed=8, endpoints=["ListObjectsV2"])
    assert [o.key for o in await faulty.list_objects(BUCKET, "", max_keys=250)] == list(objects)
    cuts = injected(emulator, "reset") + injected(emulator, "truncate")
    assert cuts >= 1 and faulty.stats.retries == cuts


async def test_a_short_206_is_detected_and_completed(faulty: S3Client,
                                                     emulator: EmulatorServers,
                                                     objects: Objects) -> None:
    key, data = list(objects.items())[-1]
    set_faults(emulator, pshort=1.0, endpoints=["GetObject"])
    async with S3Client(emulator.s3_url or "", policy=RetryPolicy(retries=0)) as strict:
        with pytest.raises(TruncatedStream, match="ended at byte"):
            await strict.read(BUCKET, key, (0, len(data)))
    assert injected(emulator, "short") == 1
    # A whole-object GET is a 200: pshort leaves it alone.
    assert await faulty.read(BUCKET, key) == data
    set_faults(emulator, pshort=0.3, seed=13, endpoints=["GetObject"])
    for key, data in list(objects.items())[:8]:
        assert await faulty.read(BUCKET, key, (3, len(data))) == data[3:]
    assert injected(emulator, "short") >= 1
    assert faulty.stats.resumes == injected(emulator, "short")


# --- hostile answers ----------------------------------------------------------------------

BODY = bytes(range(256)) * 4


def ranged(request: httpx.Request) -> tuple[int, int]:
    spec = request.headers["range"].removeprefix("bytes=")
    first, _, last = spec.partition("-")
    return int(first), int(last) if last else len(BODY) - 1


async def test_a_200_to_a_range_is_cut_to_the_range() -> None:
    def whole(request: httpx.Request) -> httpx.Response:
        assert request.headers["range"] == "bytes=100-199"
        return httpx.Response(200, content=BODY, headers={"ETag": '"abc"'})

    with ScriptedServer(whole) as url:
        async with S3Client(url, policy=QUICK) as s3, \
                s3.open(BUCKET, "a/b.dcm", (100, 200)) as stream:
            assert stream.size == 100 and stream.object_size == len(BODY)
            assert b"".join([c async for c in stream.chunks()]) == BODY[100:200]


@pytest.mark.parametrize("content_range", ["bytes 1-9/1024", "bytes 0-99/1024", "bytes 0-9",
                                           "bytes 0-20/1024"])
async def test_a_206_that_does_not_fit_is_malformed(content_range: str) -> None:
    def wrong(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, content=BODY[:10], headers={"Content-Range": content_range})

    with ScriptedServer(wrong) as url:
        async with S3Client(url, policy=QUICK) as s3:
            with pytest.raises(MalformedResponse, match="Content-Range"):
                await s3.read(BUCKET, "a/b.dcm", (0, 10))


async def test_an_object_that_changes_while_read_is_refused() -> None:
    etags = iter(['"one"', '"two"'])

    def changing(request: httpx.Request) -> httpx.Response:
        first, last = ranged(request)

        async def cut() -> AsyncIterator[bytes]:
            yield BODY[first:first + 10]
            raise ConnectionError("cut")

        return httpx.Response(206, content=cut(), headers={
            "ETag": next(etags), "Content-Length": str(last - first + 1),
            "Content-Range": f"bytes {first}-{last}/{len(BODY)}"})

    with ScriptedServer(changing) as url:
        async with S3Client(url, policy=QUICK) as s3:
            with pytest.raises(TruncatedStream, match="changed"):
                await s3.read(BUCKET, "a/b.dcm", (0, 500))


@pytest.mark.parametrize(("body", "match"), [
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><ListBucketResult/>', "DTD"),
    (b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
     "NextContinuationToken"),
    (b"<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>", "size"),
    (b"<html>hello</html>", "html where ListBucketResult"),
    (b"not xml at all", "not XML"),
])
async def test_malformed_listings(body: bytes, match: str) -> None:
    with ScriptedServer(lambda request: httpx.Response(200, content=body)) as url:
        async with S3Client(url, policy=QUICK) as s3:
            with pytest.raises(MalformedResponse, match=match):
                await s3.list_page(BUCKET, "")


async def test_a_token_that_comes_back_is_refused() -> None:
    page = (b"<ListBucketResult><IsTruncated>true</IsTruncated>"
            b"<NextContinuationToken>same</NextContinuationToken></ListBucketResult>")
    with ScriptedServer(lambda request: httpx.Response(200, content=page)) as url:
        async with S3Client(url, policy=QUICK) as s3:
            with pytest.raises(MalformedResponse, match="twice"):
                await s3.list_objects(BUCKET, "")


@pytest.mark.unit
def test_addressing() -> None:
    assert S3Client().url("idc-open-data", "a b/c.dcm") == \
        "https://idc-open-data.s3.amazonaws.com/a%20b/c.dcm"
    assert S3Client("http://127.0.0.1:9000/").url("idc-open-data", "u/v.dcm") == \
        "http://127.0.0.1:9000/idc-open-data/u/v.dcm"
    assert S3Client("http://127.0.0.1:9000").url("idc-open-data") == \
        "http://127.0.0.1:9000/idc-open-data"
