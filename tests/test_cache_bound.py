"""The cache's bound and its eviction: the bound holds under concurrent readers and for a
series larger than the cache; a cache full of open files says so; the default bound; the
order of eviction, kept across daemons, and a withdrawn series evicted first."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
import trio
from cacheutil import _disk_usage, _series, _small_disk, _sops, _truth, _with_cache

from tciafs.cache import META_SLACK, Cache, CacheFull

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


def _overhead(tmp_path: Path) -> int:
    """What an empty cache already counts against its bound: slack, databases, directories."""
    probe = Cache(tmp_path / "probe", 1 << 30, None)
    overhead = probe.used_bytes + META_SLACK
    probe.close()
    return overhead


async def test_bound_holds_under_16_concurrent_readers(emulator, client, tmp_path: Path) -> None:
    bound = _overhead(tmp_path) + 4_000_000  # room for about seven CT slices
    cache = Cache(tmp_path / "c", bound, client, prefetch=True)
    series = _series(emulator.url)
    work = [(s["SeriesInstanceUID"], sop) for s in series[:3]
            for sop in _sops(emulator.url, s["SeriesInstanceUID"])[:12]]
    peaks: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # what `du` sees, from outside the cache's own accounting
        while not stop.is_set():
            peaks.append(_disk_usage(tmp_path / "c"))
            stop.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def reader(jobs: list[tuple[str, str]]) -> None:
        for series_uid, sop in jobs:
            entry = await cache.acquire("Demo-Lung CT_2024", series_uid, sop)
            assert os.stat(entry.path).st_size == entry.size
            assert cache.used_bytes <= bound
            cache.release(entry)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(reader, work[i::16])

    try:
        await _with_cache(cache, body)
    finally:
        stop.set()
        sampler.join()
    assert max(peaks) <= bound
    assert cache.stats.evictions > 0
    cache.close()


async def test_series_larger_than_the_cache_reads_one_at_a_time(emulator, client,
                                                               tmp_path: Path) -> None:
    bound = _overhead(tmp_path) + 1_500_000  # two CT slices, far less than the series
    cache = Cache(tmp_path / "c", bound, client, prefetch=True)
    target = _series(emulator.url)[0]
    uid = target["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)

    async def body() -> None:
        for sop in _sops(emulator.url, uid)[:10]:
            entry = await cache.acquire("Demo-Lung CT_2024", uid, sop, target["FileSize"])
            assert Path(entry.path).read_bytes() == truth[sop]
            assert cache.used_bytes <= bound
            cache.release(entry)

    await _with_cache(cache, body)
    cache.close()


async def test_full_of_open_files_is_a_clear_error(emulator, client, tmp_path: Path) -> None:
    bound = _overhead(tmp_path) + 1_200_000
    cache = Cache(tmp_path / "c", bound, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)

    async def body() -> None:
        held = [await cache.acquire("Demo-Lung CT_2024", uid, sop) for sop in sops[:2]]
        with pytest.raises(CacheFull, match="cache full"):
            await cache.acquire("Demo-Lung CT_2024", uid, sops[2])
        for entry in held:
            cache.release(entry)
        entry = await cache.acquire("Demo-Lung CT_2024", uid, sops[2])  # now it fits
        cache.release(entry)

    await _with_cache(cache, body)
    assert cache.used_bytes <= bound
    assert not list((tmp_path / "c" / "tmp").iterdir())  # the refused download left nothing
    cache.close()


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_the_default_bound_is_a_tenth_of_the_cache_disk_at_most_10_gib(tmp_path: Path) -> None:
    from tciafs.mount import default_cache_size

    with _small_disk(tmp_path / "disk", "64m") as disk:
        # The cache directory need not exist yet: its disk is that of the nearest parent.
        assert default_cache_size(disk / "not" / "yet") == (64 << 20) // 10
    if shutil.disk_usage(tmp_path).total >= 100 << 30:
        assert default_cache_size(tmp_path / "cache") == 10 << 30


async def test_the_order_of_use_outlives_the_daemon(emulator, client, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    first, second = _sops(emulator.url, uid)[:2]

    async def body() -> None:
        for sop in (first, second):
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))
        for _ in range(300):  # the first is used last, and saved once on the way
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, first))

    await _with_cache(cache, body)
    cache.close()
    index = sqlite3.connect(tmp_path / "c" / "index.sqlite")
    try:
        used = dict(index.execute("SELECT sop, last_access FROM instances"))
    finally:
        index.close()
    assert used[first] > used[second] > 0
    reopened = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    try:  # a new daemon evicts the second before the first
        assert list(reopened._lru)[-2:] == [second, first]
    finally:
        reopened.close()


async def test_a_withdrawn_series_is_evicted_first(emulator, client, tmp_path: Path) -> None:
    older, withdrawn, newest = (r["SeriesInstanceUID"] for r in _series(emulator.url)[:3])
    sops = {s: _sops(emulator.url, s)[0] for s in (older, withdrawn, newest)}
    sizes: dict[str, int] = {}
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)

    async def read(series: str) -> None:
        entry = await cache.acquire("Demo-Lung CT_2024", series, sops[series])
        cache.release(entry)
        sizes[series] = entry.size

    async def body() -> None:
        await read(older)
        await read(withdrawn)  # used last, so evicted last, if not...
        assert cache.series_withdrawn(withdrawn) == (1, sizes[withdrawn], 0)  # ...withdrawn
        # Room for the newest file, but for only half of either cached one: one must go.
        # (The index keeps the order for the next start: last_access 0, which
        # test_the_order_of_use_outlives_the_daemon shows a start follows.)
        newest_size = len(httpx.get(
            f"{emulator.url}/nbia-api/services/v4/getSingleImage", timeout=30,
            params={"SeriesInstanceUID": newest, "SOPInstanceUID": sops[newest]}).content)
        cache.max_bytes = (cache.used_bytes + META_SLACK + newest_size
                           - min(sizes.values()) // 2)
        await read(newest)

    await _with_cache(cache, body)
    assert cache.is_cached(sops[older]) and not cache.is_cached(sops[withdrawn]), sizes
    cache.close()
