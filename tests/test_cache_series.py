"""Series fetches, their resumes and cut ZIPs: a series prefetch learns every file's size
and MD5; eviction makes a complete series incomplete; a series completed from its missing
files alone, or fetched file by file when its ZIP is always cut short."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest
import trio
from cacheutil import _cli, _series, _sops, _truth, _verified, _with_cache
from cliutil import status_json, status_text

from tciafs.cache import Cache, object_path

from mountutil import count_requests, mounted, needs_fuse, reset_stats, set_faults, stats

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


async def test_series_prefetch_learns_every_size(emulator, client, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)
    target = _series(emulator.url)[1]
    uid = target["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)
    truth = _truth(emulator.url, uid)
    reset_stats(emulator.url)

    async def body() -> None:
        entry = await cache.acquire("Demo-Lung CT_2024", uid, sops[-1])
        assert Path(entry.path).read_bytes() == truth[sops[-1]]
        cache.release(entry)
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        assert cache.series_complete(uid)

    await _with_cache(cache, body)
    counts = stats(emulator.url)["requests"]
    assert counts.get("getImage", 0) == 1
    assert counts.get("getSingleImage", 0) <= 1
    for sop in sops:
        assert cache.known_size(sop) == len(truth[sop])
        assert object_path(cache.root, sop).read_bytes() == truth[sop]
        assert cache.md5_of(sop) == hashlib.md5(truth[sop]).hexdigest()
    assert cache.series_complete(uid)
    cache.close()


async def test_eviction_makes_a_complete_series_incomplete(emulator, client,
                                                         tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)

    async def body() -> None:
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        assert cache.series_complete(uid)
        cache._drop(sops[0])  # as eviction does
        assert not cache.series_complete(uid)
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()  # as pin does
        assert cache.is_cached(sops[0]) and cache.series_complete(uid)

    await _with_cache(cache, body)
    cache.close()


async def test_a_series_completed_from_its_missing_files_needs_the_others_still_there(
        emulator, client, tmp_path: Path) -> None:
    """A file the series held when its missing ones were asked for, dropped before they
    came (as `verify --repair` does), leaves the series incomplete, so a read or the next
    prefetch fetches it again."""
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)

    async def listed(series: str) -> list[str]:
        return [i.uid for i in await client.instances("Demo-Lung CT_2024", series)]

    cache.instances_of = listed

    async def body() -> None:
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        cache.discard(sops[:2])
        set_faults(emulator.url, first_byte_delay_ms=1500, endpoints=["getSingleImage"])
        reset_stats(emulator.url)
        try:
            with trio.fail_after(60):
                fetch = cache.start_series_fetch("Demo-Lung CT_2024", uid)
                while not count_requests(emulator.url, "getSingleImage"):
                    await trio.sleep(0.05)
                assert cache.discard([sops[-1]]) == [sops[-1]]
                await fetch.wait()
        finally:
            set_faults(emulator.url)
        assert stats(emulator.url)["requests"] == {"getSOPInstanceUIDs": 1,
                                                   "getSingleImage": 2}
        assert cache.is_cached(sops[0]) and not cache.is_cached(sops[-1])
        assert not cache.series_complete(uid)
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        assert cache.series_complete(uid) and cache.stats.series_resumed == 1

    await _with_cache(cache, body)
    cache.close()


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("fault", ["ptruncate", "pshort"])
def test_a_series_whose_zip_is_always_cut_short_comes_file_by_file(emulator, tmp_path: Path,
                                                                   fault: str) -> None:
    """Some servers cut large ZIPs, and a link may drop more often than a ZIP lasts: no
    attempt brings the ZIP whole, so the files it lacks after them come one by one. A ZIP
    the service closes early (well formed, status 200, no MD5 list: pshort) is as short
    as one cut on the way, never a complete series."""
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    with mounted(emulator, mnt, cache_dir):
        series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
        set_faults(emulator.url, **{fault: 1.0}, endpoints=["getImage", "getImageWithMD5Hash"])
        reset_stats(emulator.url)
        try:
            fetched = _cli("prefetch", str(series))
        finally:
            set_faults(emulator.url)
        assert fetched.returncode == 0, fetched.stderr
        requests = stats(emulator.url)["requests"]
        assert requests.get("getImage", 0) + requests.get("getImageWithMD5Hash", 0) == 3
        assert 0 < requests["getSingleImage"] < len(truth)  # the cut ZIPs brought the rest
        assert {p.stem: p.read_bytes() for p in series.glob("*.dcm")} == truth
        assert stats(emulator.url)["requests"] == requests  # the reads fetched nothing more
        status = status_text(mnt)
        assert "1 series came file by file" in status
    # No MD5 list confirmed the files the ZIPs brought; each that came alone was checked
    # against the service's MD5 of it.
    confirmed = sorted(_verified(cache_dir, uid).values())
    assert confirmed.count(1) == requests["getSingleImage"] and 0 in confirmed
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert "its ZIP was cut short at each of 3 attempts" in log


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("lost", ["three", "three unconfirmed", "most"])
def test_a_partly_cached_series_fetches_only_what_it_lacks(emulator, tmp_path: Path,
                                                           lost: str) -> None:
    """A few files lost (evicted, deleted, dropped as damaged) cost those files alone,
    each checked against the MD5 the service listed before. With no such MD5 (a ZIP
    cut short before its list), or most files lost, the ZIP again; the files cached
    already are not written again."""
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    with mounted(emulator, mnt, cache_dir):
        series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
        assert _cli("prefetch", str(series)).returncode == 0
    sops = sorted(truth)
    gone = sops[::7][:3] if lost.startswith("three") else sops[:len(sops) * 3 // 4]
    for sop in gone:
        object_path(cache_dir, sop).unlink()
    if lost == "three unconfirmed":
        with contextlib.closing(sqlite3.connect(cache_dir / "index.sqlite")) as db, db:
            db.execute("UPDATE instances SET verified=0")
    with mounted(emulator, mnt, cache_dir) as daemon:
        reset_stats(emulator.url)
        written = _bytes_written(daemon.pid)
        resumed = _cli("prefetch", str(series))
        assert resumed.returncode == 0, resumed.stderr
        written = _bytes_written(daemon.pid) - written
        want = ({"getSOPInstanceUIDs": 1, "getSingleImage": 3} if lost == "three"
                else {"getSOPInstanceUIDs": 1, "getImage": 1})
        assert stats(emulator.url)["requests"] == want
        lost_bytes = sum(len(truth[sop]) for sop in gone)
        kept_bytes = sum(map(len, truth.values())) - lost_bytes
        assert written < lost_bytes + kept_bytes // 2  # the index's writes are small
        assert {p.stem: p.read_bytes() for p in series.glob("*.dcm")} == truth
        assert stats(emulator.url)["requests"] == want  # the reads fetched nothing more
        status = status_json(mnt)
        assert status["cache"]["series_resumed"] == (lost == "three")
    assert set(_verified(cache_dir, uid).values()) == {1}
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert ("fetching its 3 missing files one by one" in log) == (lost == "three")


def _bytes_written(pid: int) -> int:
    """What a process has passed to write() so far."""
    io_counts = Path(f"/proc/{pid}/io").read_text().split()
    return int(io_counts[io_counts.index("wchar:") + 1])
