"""Every single image checked before a reader sees it.

getSingleImage carries no checksum. The cache checks each file it fetches alone against
its series' MD5 list when one is known, else against the MD5 the service keeps for the
image (v1 getM5HashForImage), asked alongside the download. The service gives that MD5
for public images only: an image of a restricted collection is served unconfirmed until
its series' list confirms it (docs/cache.md, "Integrity: how a file gets in").

The service here damages images at the source (`pcorrupt` on getSingleImage), as damaged
storage would: the bytes come whole, with the right size and header, and only an MD5
tells them apart.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
from cacheutil import _series, _sops, _truth, _verified, _with_cache
from cliutil import run_tciafs

from tciafs.cache import Cache, FetchFailed
from tciafs.catalog import Kind
from tciafs.sources.nbia import Credentials, NbiaSource

from conftest import EmulatorProcess, start_emulator
from mountutil import count_requests, mounted, needs_fuse, reset_stats, set_faults, stats

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount

LUNG = "Demo-Lung CT_2024"
RESTRICTED = "Demo-Restricted Prostate_MR"
PASSWORD = "alices-Pa55word"


@pytest.fixture(scope="module")
def service(demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[EmulatorProcess]:
    """The demo archive, with a user granted its restricted collection."""
    users = tmp_path_factory.mktemp("users") / "users.json"
    users.write_text(json.dumps({"alice": {"password": PASSWORD, "collections": ["*"]}}))
    emu = start_emulator(demo_data_dir, "--profile", "demo", "--users-file", str(users),
                         nlst=True)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def faults(service: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The service, its faults cleared after the test."""
    yield service
    set_faults(service.url)


@pytest.fixture
async def guest(service: EmulatorProcess) -> AsyncIterator[NbiaSource]:
    async with NbiaSource(service.url, nlst_server=service.nlst_url, timeout=10) as source:
        await source.collections()  # routes each collection to its server
        yield source


@pytest.fixture
async def alice(service: EmulatorProcess) -> AsyncIterator[NbiaSource]:
    async with NbiaSource(service.url, nlst_server=service.nlst_url, timeout=10,
                          credentials=Credentials("alice", PASSWORD)) as source:
        await source.collections()
        yield source


def _alice_headers(url: str) -> dict[str, str]:
    token = httpx.post(f"{url}/nbia-api/oauth/token", timeout=10, data={
        "grant_type": "password", "username": "alice", "password": PASSWORD})
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def _restricted_series(url: str) -> str:
    rows = httpx.get(f"{url}/nbia-api/services/v4/getSeries", headers=_alice_headers(url),
                     params={"Collection": RESTRICTED}, timeout=30).json()
    return rows[0]["SeriesInstanceUID"]


async def _read_each(cache: Cache, collection: str, series: str, sops: list[str]
                     ) -> tuple[dict[str, bytes], list[str]]:
    """What a reader of each file gets: its bytes, or an error (the sops refused)."""
    served, refused = {}, []
    for sop in sops:
        try:
            entry = await cache.acquire(collection, series, sop)
        except FetchFailed as exc:
            assert "MD5" in str(exc), exc
            assert not cache.is_cached(sop)
            refused.append(sop)
            continue
        served[sop] = Path(entry.path).read_bytes()
        cache.release(entry)
    return served, refused


@pytest.mark.parametrize("chance", [1.0, 0.5])
async def test_images_damaged_at_the_source_never_reach_a_reader(
        faults: EmulatorProcess, guest: NbiaSource, tmp_path: Path, chance: float) -> None:
    url = faults.url
    uid = _series(url)[1]["SeriesInstanceUID"]
    truth = _truth(url, uid)
    sops = sorted(truth)[:10]
    set_faults(url, pcorrupt=chance, endpoints=["getSingleImage"], seed=3)
    reset_stats(url)
    # Never prefetched: each file comes alone. Two attempts: a quarter of the files stay
    # damaged at 0.5.
    cache = Cache(tmp_path / "c", 1 << 30, guest, prefetch=False, attempts=2)

    async def body() -> None:
        served, refused = await _read_each(cache, LUNG, uid, sops)
        assert {sop: truth[sop] for sop in served} == served  # never a wrong byte
        damaged = stats(url)["faults"]["corrupt"]
        assert damaged and cache.stats.md5_mismatches == damaged  # each one caught
        if chance == 1.0:
            assert refused == sops
        else:
            assert served  # some came whole, at the first attempt or a later one
        set_faults(url)  # the service mends its storage: the same reads succeed
        assert await _read_each(cache, LUNG, uid, sops) == ({s: truth[s] for s in sops}, [])

    await _with_cache(cache, body)
    cache.close()
    assert _verified(tmp_path / "c", uid) == dict.fromkeys(sops, 1)


@pytest.mark.parametrize("held", ["getSingleImage", "getM5HashForImage"])
async def test_the_md5_is_asked_alongside_the_image(faults: EmulatorProcess,
                                                    guest: NbiaSource, tmp_path: Path,
                                                    held: str) -> None:
    """While either request waits 6 s for its first byte, the other is already made: the
    read waits for the slower of the two, not for both in turn. (The bound below is the
    order of events against the injected wait, not a speed.)"""
    url = faults.url
    uid = _series(url)[1]["SeriesInstanceUID"]
    sop = _sops(url, uid)[0]
    other = "getM5HashForImage" if held == "getSingleImage" else "getSingleImage"
    set_faults(url, first_byte_delay_ms=6000, endpoints=[held])
    reset_stats(url)
    cache = Cache(tmp_path / "c", 1 << 30, guest, prefetch=False)

    async def read(done: trio.Event) -> None:
        cache.release(await cache.acquire(LUNG, uid, sop))
        done.set()

    async def body() -> None:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, done)
            with trio.fail_after(4):  # well inside the held request's 6 s
                while not (count_requests(url, held) and count_requests(url, other)):
                    await trio.sleep(0.05)
            assert not done.is_set()

    await _with_cache(cache, body)
    cache.close()
    assert stats(url)["requests"]["getM5HashForImage"] == 1
    assert _verified(tmp_path / "c", uid) == {sop: 1}


async def test_an_image_whose_md5_cannot_be_had_is_not_served(faults: EmulatorProcess,
                                                               tmp_path: Path) -> None:
    url = faults.url
    uid = _series(url)[1]["SeriesInstanceUID"]
    sop = _sops(url, uid)[0]
    set_faults(url, p503=1.0, endpoints=["getM5HashForImage"])
    async with NbiaSource(url, nlst_server=faults.nlst_url, timeout=10, retries=1,
                          backoff_base=0.05) as source:
        await source.collections()
        cache = Cache(tmp_path / "c", 1 << 30, source, prefetch=False)

        async def body() -> None:
            with pytest.raises(FetchFailed, match="getM5HashForImage"):
                await cache.acquire(LUNG, uid, sop)
            assert not cache.is_cached(sop)
            set_faults(url)
            cache.release(await cache.acquire(LUNG, uid, sop))

        await _with_cache(cache, body)
        cache.close()
    assert _verified(tmp_path / "c", uid) == {sop: 1}


async def test_a_restricted_image_is_served_unconfirmed_until_its_series_list_comes(
        service: EmulatorProcess, alice: NbiaSource, tmp_path: Path) -> None:
    url = service.url
    uid = _restricted_series(url)
    truth = _truth(url, uid, _alice_headers(url))
    sop = sorted(truth)[0]
    reset_stats(url)
    cache = Cache(tmp_path / "c", 1 << 30, alice, prefetch=False)

    async def read() -> None:
        assert await _read_each(cache, RESTRICTED, uid, [sop]) == ({sop: truth[sop]}, [])

    await _with_cache(cache, read)
    cache.close()
    # Asked, and the service gives the guest's answer: none.
    assert stats(url)["requests"]["getM5HashForImage"] == 1
    assert _verified(tmp_path / "c", uid) == {sop: 0}
    verify = run_tciafs("cache", "verify", "--cache-dir", str(tmp_path / "c"))
    assert "checked 1 files: 0 bad, 1 not yet confirmed" in verify.stdout, verify.stdout
    cache = Cache(tmp_path / "c", 1 << 30, alice, prefetch=True)

    async def fetch_series() -> None:
        with trio.fail_after(60):
            await cache.start_series_fetch(RESTRICTED, uid).wait()
        assert cache.series_complete(uid)

    await _with_cache(cache, fetch_series)
    cache.close()
    assert _verified(tmp_path / "c", uid) == dict.fromkeys(truth, 1)


@needs_fuse
@pytest.mark.mount
def test_no_reader_of_a_mount_gets_a_damaged_image(faults: EmulatorProcess,
                                                   tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    url = faults.url
    uid = _series(url)[1]["SeriesInstanceUID"]
    truth = _truth(url, uid)
    with mounted(faults, mnt, cache_dir, "--no-prefetch"):
        series = next(mnt.glob(f"{LUNG}/*/*/{uid}"))
        files = sorted(series.glob("*.dcm"))[:6]
        set_faults(url, pcorrupt=1.0, endpoints=["getSingleImage"])
        for path in files[:3]:
            with pytest.raises(OSError) as err:
                path.read_bytes()
            assert err.value.errno == errno.EIO
        set_faults(url, pcorrupt=0.5, endpoints=["getSingleImage"], seed=11)
        for path in files:
            try:
                assert path.read_bytes() == truth[path.stem]
            except OSError as exc:
                assert exc.errno == errno.EIO
        set_faults(url)
        for path in files:
            assert path.read_bytes() == truth[path.stem]
    assert set(_verified(cache_dir, uid).values()) == {1}


def _login(tmp_path: Path) -> list[str]:
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"user": "alice", "password": PASSWORD}))
    creds.chmod(0o600)
    return ["--credentials-file", str(creds)]


@needs_fuse
@pytest.mark.mount
def test_bytes_the_md5_list_refuses_leave_the_kernels_page_cache(faults: EmulatorProcess,
                                                                 tmp_path: Path) -> None:
    """Nothing checks a restricted image fetched alone before its series' list comes:
    when the list refuses it, the kernel forgets it too."""
    mnt, url = tmp_path / "mnt", faults.url
    uid = _restricted_series(url)
    truth = _truth(url, uid, _alice_headers(url))
    with mounted(faults, mnt, tmp_path / "cache", "--no-prefetch", *_login(tmp_path)):
        series = next(mnt.glob(f"{RESTRICTED}/*/*/{uid}"))
        first = sorted(series.glob("*.dcm"))[0]
        want = truth[first.stem]
        set_faults(url, pcorrupt=1.0, endpoints=["getSingleImage"])
        early = first.read_bytes()  # no MD5 to check it against: served unconfirmed
        assert early != want and early[:-1] == want[:-1]
        set_faults(url)
        run_tciafs("cache", "prefetch", str(series), check=True, timeout=120)
        assert first.read_bytes() == want  # not the refused bytes, still in the kernel


@needs_fuse
@pytest.mark.mount
def test_a_series_re_submitted_to_the_service_reads_as_it_is_now(faults: EmulatorProcess,
                                                                 tmp_path: Path) -> None:
    """Files read before a re-submission (here: bytes that differ from the service's
    now, as only a restricted image fetched alone may be kept) are read anew after it."""
    mnt, cache_dir, url = tmp_path / "mnt", tmp_path / "cache", faults.url
    uid = _restricted_series(url)
    truth = _truth(url, uid, _alice_headers(url))
    with mounted(faults, mnt, cache_dir, "--no-prefetch", "--listing-ttl", "0",
                 *_login(tmp_path)):
        series = next(mnt.glob(f"{RESTRICTED}/*/*/{uid}"))
        first, second = sorted(series.glob("*.dcm"))[:2]
        want, want2 = truth[first.stem], truth[second.stem]
        set_faults(url, pcorrupt=1.0, endpoints=["getSingleImage"])  # the bytes as before
        old, old2 = first.read_bytes(), second.read_bytes()
        assert old != want and first.read_bytes() == old  # cached, and in the kernel
        assert old2 != want2
        set_faults(url)
        assert first.read_bytes() == old
        held = second.open("rb")  # open while the re-submission is found

        catalog = sqlite3.connect(next(cache_dir.glob("catalog-*.sqlite")), timeout=30)
        try:  # the stored listing shows an earlier submission than the service now does
            catalog.execute("UPDATE nodes SET meta=json_set(meta, '$.submission_date', "
                            "'2001-02-03') WHERE kind=? AND ident=?", (int(Kind.SERIES), uid))
            catalog.commit()
        finally:
            catalog.close()
        os.listdir(series.parent)  # the study is listed again: the series was re-submitted
        assert first.read_bytes() == want  # neither the cache nor the kernel kept the old
        with held:
            assert held.read() == old2  # an open file keeps its bytes until closed
        assert second.read_bytes() == want2  # then they are dropped too


async def test_a_source_without_instance_md5s_serves_files_unconfirmed(
        faults: EmulatorProcess, tmp_path: Path) -> None:
    """The legacy API gives no MD5 of one image: a file fetched alone is served at once,
    unconfirmed, with no MD5 asked for and none waited on."""
    url = faults.url
    uid = _series(url)[1]["SeriesInstanceUID"]
    sop = _sops(url, uid)[0]
    reset_stats(url)
    async with NbiaSource(url, api="legacy", nlst_server=None, timeout=10) as legacy:
        assert not legacy.capabilities.instance_checksums
        cache = Cache(tmp_path / "c", 1 << 30, legacy, prefetch=False)

        async def body() -> None:
            with trio.fail_after(60):
                entry = await cache.acquire(LUNG, uid, sop)
            cache.release(entry)
            assert Path(entry.path).read_bytes() == _truth(url, uid)[sop]

        await _with_cache(cache, body)
        cache.close()
    assert "getM5HashForImage" not in stats(url)["requests"]
    assert _verified(tmp_path / "c", uid) == {sop: 0}
