"""A series over a few connections at once, within its caps (docs/connections.md).

While a series' ZIP streams, single images come from the back of its listing on extra
connections, each checked against its own MD5 before a reader sees it. The emulator here
is shaped (latency and a per-answer bandwidth), so that the ZIP lasts long enough for
its measured rate to call for the extra connections; it counts the requests it answers
at once. No test here holds a timing: only counts, caps and bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cacheutil import _series, _sops, _truth, _verified, _with_cache
from parallelutil import OpenDownloads

from tciafs.cache import Cache, FetchFailed
from tciafs.cache.parallel import Connections
from tciafs.sources.nbia import NbiaSource

from conftest import EmulatorProcess
from mountutil import reset_stats, set_faults, stats

DEFAULT_TIER = "handler"

LUNG = "Demo-Lung CT_2024"
ZIP_SECONDS = 4.0  # how long the shaped ZIP of the test series would take alone


@pytest.fixture(scope="module")
def series_truth(emulator: EmulatorProcess) -> tuple[str, dict[str, bytes], list[str]]:
    """The largest demo series: its UID, its bytes by SOP UID, its listing."""
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    return uid, _truth(emulator.url, uid), _sops(emulator.url, uid)


@pytest.fixture
def shaped(emulator: EmulatorProcess, series_truth: tuple[str, dict[str, bytes], list[str]]
           ) -> Iterator[EmulatorProcess]:
    """The emulator with each answer slowed so that the series' ZIP takes a few seconds;
    every fault cleared after the test."""
    zip_bytes = sum(len(b) for b in series_truth[1].values()) // 2  # about, DEFLATEd
    set_faults(emulator.url, latency_ms=30, bandwidth=int(zip_bytes / ZIP_SECONDS))
    reset_stats(emulator.url)
    yield emulator
    set_faults(emulator.url)


def _cache(root: Path, source: NbiaSource, listing: list[str], connections: Connections
           ) -> Cache:
    cache = Cache(root, 1 << 30, source, connections=connections)

    async def instances_of(series: str) -> list[str]:
        return listing

    cache.instances_of = instances_of
    cache.prefetcher.held_instances_of = lambda series: listing  # as if listed by a reader
    return cache


async def test_a_series_uses_a_few_connections_and_no_more(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    uid, truth, listing = series_truth
    cache = _cache(tmp_path / "c", client, listing, Connections(3, 6))
    requests = OpenDownloads(client)

    async def body() -> None:
        await cache.start_series_fetch(LUNG, uid).wait()

    await _with_cache(cache, body)
    seen = stats(shaped.url)
    assert seen["requests"].get("getImage") == 1
    singles = seen["requests"].get("getSingleImage", 0)
    assert singles > 0, "no single image came beside the ZIP"
    assert seen["peak_concurrent_requests"]["getSingleImage"] >= 2  # in parallel
    assert requests.peak == 3  # the series' cap, its ZIP included
    # No file asked alone twice; every file byte for byte, and confirmed by an MD5.
    assert requests.alone and max(requests.alone.values()) == 1
    for sop, data in truth.items():
        assert cache.store.path(sop).read_bytes() == data
    assert set(_verified(tmp_path / "c", uid).values()) == {1}
    assert cache.series_complete(uid)


async def test_singles_take_the_series_from_the_back(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    """The ZIP comes in the listing's order (both in database order), so the workers
    start at the listing's end and the files they bring make one run at its back."""
    uid, _truth_bytes, listing = series_truth
    cache = _cache(tmp_path / "c", client, listing, Connections(4, 6))
    requests = OpenDownloads(client)

    async def body() -> None:
        await cache.start_series_fetch(LUNG, uid).wait()

    await _with_cache(cache, body)
    alone = set(requests.alone)
    assert len(alone) >= 10, "too few singles came to tell where they were taken"
    assert {listing[-1], listing[-2], listing[-3]} <= alone  # the workers' first picks
    back = listing[min(listing.index(sop) for sop in alone):]
    # Within that run, only the files the ZIP was writing or held to publish when the
    # two met came another way.
    assert len(set(back) - alone) <= 12
    assert cache.series_complete(uid)


async def test_singles_give_way_to_a_series_waiting_for_a_connection(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    """With the mount's cap held by one series' ZIP and its workers, another series'
    ZIP gets a connection as soon as a worker's image is done, long before the first
    series is whole."""
    uid, _truth_bytes, listing = series_truth
    other = next(r for r in _series(shaped.url) if r["SeriesInstanceUID"] != uid)
    other_uid = other["SeriesInstanceUID"]
    cache = _cache(tmp_path / "c", client, listing, Connections(3, 3))
    missing_when_other_opened: list[int] = []
    open_series = client.open_series

    def counted(collection: str, series: str, **kwargs):  # type: ignore[no-untyped-def]
        if series == other_uid:
            missing_when_other_opened.append(
                len(listing) - cache.contents.series_files[uid])
        return open_series(collection, series, **kwargs)

    client.open_series = counted  # type: ignore[method-assign]

    async def body() -> None:
        first = cache.start_series_fetch(LUNG, uid)
        with trio.fail_after(60):
            while (cache.prefetcher.singles.get(uid) is None
                   or cache.prefetcher.singles[uid].workers < 2):
                await trio.sleep(0.005)
        second = cache.start_series_fetch(other["Collection"], other_uid)
        await first.wait()
        await second.wait()

    await _with_cache(cache, body)
    assert missing_when_other_opened, "the other series' ZIP never opened"
    # Opened while most of the first series was still to come (a run without giving
    # way opens it only when the workers stop, where the ZIP meets them).
    assert missing_when_other_opened[0] > len(listing) // 4
    assert cache.series_complete(uid) and cache.series_complete(other_uid)


async def test_the_mount_cap_holds_across_series(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path) -> None:
    rows = _series(shaped.url)[:3]
    listings = {r["SeriesInstanceUID"]: _sops(shaped.url, r["SeriesInstanceUID"])
                for r in rows}
    cache = Cache(tmp_path / "c", 1 << 30, client, connections=Connections(4, 3))
    requests = OpenDownloads(client)

    async def instances_of(series: str) -> list[str]:
        return listings[series]

    cache.instances_of = instances_of
    cache.prefetcher.held_instances_of = listings.get

    async def body() -> None:
        events = [cache.start_series_fetch(r["Collection"], r["SeriesInstanceUID"])
                  for r in rows]
        for event in events:
            await event.wait()

    await _with_cache(cache, body)
    assert requests.peak == 3  # the mount's cap
    assert stats(shaped.url)["requests"].get("getSingleImage", 0) > 0
    for uid in listings:
        assert cache.series_complete(uid)


@pytest.mark.parametrize("chance", [1.0, 0.4])
async def test_singles_damaged_at_the_source_never_reach_a_reader(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path, chance: float,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    uid, truth, listing = series_truth
    zip_bytes = sum(len(b) for b in truth.values()) // 2
    set_faults(shaped.url, latency_ms=30, bandwidth=int(zip_bytes / ZIP_SECONDS),
               pcorrupt=chance, endpoints=["getSingleImage"], seed=5)
    cache = _cache(tmp_path / "c", client, listing, Connections(4, 6))
    served: dict[str, bytes] = {}
    refused: list[str] = []

    async def read(sop: str) -> None:
        try:
            entry = await cache.acquire(LUNG, uid, sop)
        except FetchFailed:  # the reader's own single failed its MD5 every time
            refused.append(sop)
            return
        served[sop] = Path(entry.path).read_bytes()
        cache.release(entry)

    async def body() -> None:
        done = cache.start_series_fetch(LUNG, uid)
        # Readers from the back, where the singles work, while the series comes.
        async with trio.open_nursery() as nursery:
            for sop in reversed(listing):
                nursery.start_soon(read, sop)
                await trio.sleep(0.02)
        await done.wait()

    await _with_cache(cache, body)
    assert stats(shaped.url)["faults"]["corrupt"] > 0  # damaged singles were sent
    assert served.keys() | set(refused) == truth.keys()
    assert served  # readers got files: the checks below are not empty
    wrong = [sop for sop, data in served.items() if data != truth[sop]]
    assert wrong == []
    # The series ends whole and right: the ZIP brought what no single could.
    assert cache.series_complete(uid)
    for sop, data in truth.items():
        assert cache.store.path(sop).read_bytes() == data


async def test_a_reader_joins_the_single_under_way(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    uid, truth, listing = series_truth
    cache = _cache(tmp_path / "c", client, listing, Connections(4, 6))
    requests = OpenDownloads(client)
    joined: list[str] = []

    async def body() -> None:
        done = cache.start_series_fetch(LUNG, uid)
        with trio.fail_after(60):
            while not any(sop in cache.fetcher.fetching for sop in listing):
                await trio.sleep(0.005)
        sop = next(sop for sop in listing if sop in cache.fetcher.fetching)
        entry = await cache.acquire(LUNG, uid, sop)
        joined.append(hashlib.md5(Path(entry.path).read_bytes()).hexdigest())
        cache.release(entry)
        await done.wait()
        joined.append(sop)

    await _with_cache(cache, body)
    md5, sop = joined
    assert md5 == hashlib.md5(truth[sop]).hexdigest()
    # The reader's file was asked once: by the single it joined, not by one of its own.
    assert requests.alone[sop] == 1
    assert max(requests.alone.values()) == 1
    seen = stats(shaped.url)["requests"]
    assert seen.get("getImage") == 1


async def test_one_connection_per_series_is_one_stream(
        shaped: EmulatorProcess, client: NbiaSource, tmp_path: Path,
        series_truth: tuple[str, dict[str, bytes], list[str]]) -> None:
    uid, truth, listing = series_truth
    cache = _cache(tmp_path / "c", client, listing, Connections(1, 6))

    async def body() -> None:
        await cache.start_series_fetch(LUNG, uid).wait()

    await _with_cache(cache, body)
    assert stats(shaped.url)["requests"].get("getSingleImage", 0) == 0
    assert cache.series_complete(uid)
