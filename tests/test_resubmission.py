"""A series that a site re-submits to the service while a mount runs.

The service's archive changes under a running mount, as NBIA's does: the same UIDs,
other bytes, a later submission timestamp. The mount notices when the study is listed
again, here at once (--listing-ttl 0).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cliutil import run_tciafs
from test_emulator_support import CT_LUNG, PLANS, SeriesPlan, TinyArchive, uid

from tciafs.cache import Cache, FetchFailed
from tciafs.emulator.faults import FaultConfig
from tciafs.emulator.server import EmulatorServers, Options
from tciafs.pagecache import PUSH_LIMIT
from tciafs.sources.nbia import NbiaSource

from mountutil import (
    IMAGE_ENDPOINTS,
    count_requests,
    lazy_unmount,
    mounted,
    needs_fuse,
    reset_stats,
    set_faults,
)

DEFAULT_TIER = "handler"  # marked tests mount

# Two instances of 2100 x 2100 16-bit pixels: each file is larger than what the daemon
# hands to the kernel's page cache at open, so the kernel fills it through reads.
LARGE = SeriesPlan("ct-large", CT_LUNG, "TCL 002/b", "s2", "CT", 2, "LUNG", None, size=2100)
SMALL = SeriesPlan("ct-small", CT_LUNG, "TCL 002/b", "s2", "CT", 3, "LUNG", None)
# 20 files of incompressible pixels, about 660 kB: slow enough to re-submit mid-download.
NOISY = SeriesPlan("ct-noisy", CT_LUNG, "TCL 002/b", "s2", "CT", 20, "LUNG", None, size=128,
                   noise=True)
FIRST = dt.datetime(2019, 5, 6, 7, 8, 9)  # before the collection's release (2020-03-15)
AGAIN = dt.datetime(2024, 1, 2, 3, 4, 5)


@pytest.fixture
def archive() -> Iterator[TinyArchive]:
    archive = TinyArchive()
    archive.submit(LARGE, "before", FIRST)
    archive.submit(SMALL, "before", FIRST)
    archive.submit(NOISY, "before", FIRST)
    yield archive


def _instance(mnt: Path, plan: SeriesPlan, n: int) -> Path:
    series = next(mnt.glob(f"*/*/{uid(plan.study)}/{uid(plan.key)}"))
    return series / f"{uid(plan.key, n)}.dcm"


@needs_fuse
@pytest.mark.mount
def test_a_large_file_held_open_across_a_re_submission_reads_anew_once_closed(
        archive: TinyArchive, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--no-prefetch", "--listing-ttl", "0"):
        path = _instance(mnt, LARGE, 1)
        before = path.read_bytes()
        assert len(before) > PUSH_LIMIT and b"before" in before
        with path.open("rb") as held:
            # Same length of comment: the size stays, so the kernel sees no change of
            # its own; only the daemon can tell it that its pages are old.
            archive.submit(LARGE, "after ", AGAIN)
            os.listdir(path.parent.parent)  # the study, listed again
            assert held.read() == before  # an open file keeps its bytes until closed
        after = path.read_bytes()
        assert len(after) == len(before) and b"after " in after


@needs_fuse
@pytest.mark.mount
def test_a_file_held_open_across_a_re_submission_is_not_served_after_a_crash(
        archive: TinyArchive, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with EmulatorServers(archive, Options()) as servers:
        with mounted(servers, mnt, cache_dir, "--listing-ttl", "0") as daemon:
            path = _instance(mnt, SMALL, 1)
            held = os.open(path, os.O_RDONLY)
            assert b"before" in os.read(held, 1 << 20)
            archive.submit(SMALL, "after ", AGAIN)
            os.listdir(path.parent.parent)  # the study, listed again
            os.kill(daemon.pid, signal.SIGKILL)  # before the last release
            daemon.wait(timeout=10)
            with contextlib.suppress(OSError):  # ENOTCONN: nobody answers the close
                os.close(held)
            lazy_unmount(mnt)
        # The new timestamp is stored now: only the index can tell the copy is old.
        with mounted(servers, mnt, cache_dir):
            assert b"after " in _instance(mnt, SMALL, 1).read_bytes()


@needs_fuse
@pytest.mark.mount
def test_rsync_of_a_re_submitted_series_brings_its_new_bytes(archive: TinyArchive,
                                                            tmp_path: Path) -> None:
    mnt, cache_dir, copy = tmp_path / "mnt", tmp_path / "cache", tmp_path / "copy"
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0"):
        series = _instance(mnt, SMALL, 1).parent
        _rsync(series, copy)
        first = {p.name: (p.read_bytes(), p.stat().st_mtime) for p in copy.glob("*.dcm")}
        assert len(first) == SMALL.count
        assert all(b"before" in data for data, _ in first.values())

        archive.submit(SMALL, "after ", AGAIN)  # the same sizes: only the time can tell
        os.listdir(series.parent)  # the study, listed again
        _rsync(series, copy)
        for name, (data, mtime) in first.items():
            now = copy / name
            assert b"after " in now.read_bytes() and now.stat().st_size == len(data)
            assert now.stat().st_mtime > mtime


def _rsync(source: Path, dest: Path) -> None:
    """What a researcher keeping a local mirror runs: size and time tell what changed."""
    subprocess.run(["rsync", "-a", f"{source}/", str(dest)], check=True, timeout=120,
                   capture_output=True)


def _client(servers: EmulatorServers) -> NbiaSource:
    return NbiaSource(servers.url, nlst_server=None, timeout=10)  # the emulator serves no NLST


async def _read_series(cache: Cache, plan: SeriesPlan) -> list[bytes]:
    out = []
    for n in range(1, plan.count + 1):
        entry = await cache.acquire(CT_LUNG, uid(plan.key), uid(plan.key, n))
        try:
            out.append(Path(entry.path).read_bytes())
        finally:
            cache.release(entry)
    return out


async def _fetch_until(cache: Cache, plan: SeriesPlan, files_in: int) -> trio.Event:
    """Start fetching the series and return once `files_in` of its files are published;
    returns the fetch's completion event."""
    series = uid(plan.key)
    done = cache.start_series_fetch(CT_LUNG, series)
    with trio.fail_after(30):
        while cache.in_flight.get(series, [0, 0])[1] < files_in:
            await trio.sleep(0.01)
    return done


async def _re_submit_and_check(archive: TinyArchive, cache: Cache, plan: SeriesPlan,
                               done: trio.Event) -> None:
    """Re-submit the series mid-fetch: the fetch must end with only the new bytes."""
    series = uid(plan.key)
    archive.submit(plan, "after ", AGAIN)
    cache.drop_revised(series)  # as the mount does on seeing the new timestamp
    with trio.fail_after(60):
        await done.wait()
    assert cache.series_complete(series), cache.failed_series
    assert all(b"after " in data for data in await _read_series(cache, plan))
    assert cache.stats.md5_mismatches == 0


async def test_a_series_fetch_that_a_re_submission_overtakes_keeps_none_of_its_bytes(
        archive: TinyArchive, tmp_path: Path) -> None:
    with EmulatorServers(archive, Options(faults=FaultConfig(bandwidth=400_000))) as servers:
        async with _client(servers) as client, trio.open_nursery() as nursery:
            cache = Cache(tmp_path / "c", 1 << 30, client)
            await nursery.start(cache.run)
            done = await _fetch_until(cache, NOISY, files_in=2)
            await _re_submit_and_check(archive, cache, NOISY, done)
            nursery.cancel_scope.cancel()
        cache.close()


async def test_a_re_submission_between_a_zips_last_file_and_its_end_is_caught(
        archive: TinyArchive, tmp_path: Path) -> None:
    """Every file of the old bytes is in, but the ZIP (and the MD5 list in it) has not
    ended: the list and the files it vouches for belong to the old series."""
    slow_end = FaultConfig(last_byte_delay_ms=1500, endpoints=("getImage",))
    with EmulatorServers(archive, Options(faults=slow_end)) as servers:
        async with _client(servers) as client, trio.open_nursery() as nursery:
            cache = Cache(tmp_path / "c", 1 << 30, client)
            await nursery.start(cache.run)
            done = await _fetch_until(cache, SMALL, files_in=SMALL.count)
            assert not done.is_set()  # the ZIP's last byte is still to come
            set_faults(servers.url)  # the fetch begun anew ends at once
            await _re_submit_and_check(archive, cache, SMALL, done)
            nursery.cancel_scope.cancel()
        cache.close()


async def test_files_a_fetch_brings_after_a_withdrawal_go_first(archive: TinyArchive,
                                                                tmp_path: Path) -> None:
    series = uid(NOISY.key)
    with EmulatorServers(archive, Options(faults=FaultConfig(bandwidth=400_000))) as servers:
        async with _client(servers) as client, trio.open_nursery() as nursery:
            cache = Cache(tmp_path / "c", 1 << 30, client)
            await nursery.start(cache.run)
            done = await _fetch_until(cache, NOISY, files_in=2)
            cache.series_withdrawn(series)  # as the mount does, seeing it gone
            await _read_series(cache, SMALL)  # used now: evicted after all of NOISY
            assert not done.is_set()
            with trio.fail_after(60):
                await done.wait()
            assert cache.cached_count(series) == NOISY.count
            assert _last_access(tmp_path / "c", series) == {0.0}  # all 20 of them
            ahead = list(cache._lru)[:NOISY.count]  # the first to go, in this run too
            assert sorted(ahead) == sorted(uid(NOISY.key, n) for n in range(1, NOISY.count + 1))
            # Back as it was: files fetched from then on are used as any others.
            cache.series_back(series)
            cache.clear(series)
            await _read_series(cache, NOISY)
            assert 0.0 not in _last_access(tmp_path / "c", series)
            nursery.cancel_scope.cancel()
        cache.close()


async def test_md5s_listed_for_the_old_bytes_do_not_refuse_the_new_ones(
        archive: TinyArchive, tmp_path: Path) -> None:
    series = uid(SMALL.key)
    with EmulatorServers(archive, Options()) as servers:
        async with _client(servers) as client, trio.open_nursery() as nursery:
            cache = Cache(tmp_path / "c", 1 << 30, client, attempts=2)
            await nursery.start(cache.run)
            # Every image damaged on the way: the MD5 list refuses them all, for now.
            set_faults(servers.url, pcorrupt=1.0, endpoints=["getImage", "getSingleImage"])
            await cache.start_series_fetch(CT_LUNG, series).wait()
            assert not cache.series_complete(series) and cache.stats.md5_mismatches
            with pytest.raises(FetchFailed):
                await _read_series(cache, SMALL)
            set_faults(servers.url)
            archive.submit(SMALL, "after ", AGAIN)
            cache.drop_revised(series)
            assert all(b"after " in data for data in await _read_series(cache, SMALL))
            nursery.cancel_scope.cancel()
        cache.close()


async def test_md5s_that_confirmed_evicted_copies_do_not_refuse_the_new_bytes(
        archive: TinyArchive, tmp_path: Path) -> None:
    series = uid(SMALL.key)
    with EmulatorServers(archive, Options()) as servers:
        async with _client(servers) as client, trio.open_nursery() as nursery:
            cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False, attempts=2)
            await nursery.start(cache.run)
            await cache.start_series_fetch(CT_LUNG, series).wait()
            assert set(_verified(tmp_path / "c", series)) == {1}
            cache.clear(series)  # evicted: the index keeps their sizes and MD5s
            archive.submit(SMALL, "after ", AGAIN)
            cache.drop_revised(series)
            assert all(b"after " in data for data in await _read_series(cache, SMALL))
            nursery.cancel_scope.cancel()
        cache.close()


def _verified(root: Path, series: str) -> list[int]:
    db = sqlite3.connect(root / "index.sqlite")
    try:
        return [v for v, in db.execute("SELECT verified FROM instances WHERE series=?",
                                       (series,))]
    finally:
        db.close()


@needs_fuse
@pytest.mark.mount
def test_a_withdrawn_series_can_still_be_unpinned_and_cleared(archive: TinyArchive,
                                                              tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    series_uid = uid(SMALL.key)
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0"):
        series = _instance(mnt, SMALL, 1).parent
        _cache_cli("pin", str(series))
        assert _stats(cache_dir)["pinned"] == SMALL.count
        archive.withdraw(SMALL)  # TCIA retracts it
        assert series.name not in os.listdir(series.parent)  # the study, listed again
        # Nothing on the mount names it now; `cache stats` still shows its UID.
        _cache_cli("unpin", series_uid, "--mount", str(mnt))
        assert _stats(cache_dir)["pinned"] == 0
        _cache_cli("clear", series_uid, "--mount", str(mnt))
        assert _stats(cache_dir)["entries"] == 0


@needs_fuse
@pytest.mark.mount
def test_a_series_withdrawn_and_back_with_new_bytes_reads_as_it_is_now(
        archive: TinyArchive, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0"):
        path = _instance(mnt, SMALL, 1)
        assert b"before" in path.read_bytes()
        study, name = path.parent.parent, path.parent.name
        archive.withdraw(SMALL)
        assert name not in os.listdir(study)
        # Corrected and submitted again: the listing no longer holds the old timestamp
        # to compare with, so only the withdrawal, remembered, can tell.
        archive.submit(SMALL, "after ", AGAIN)
        assert name in os.listdir(study)
        assert all(b"after " in _instance(mnt, SMALL, n).read_bytes()
                   for n in range(1, SMALL.count + 1))


@needs_fuse
@pytest.mark.mount
def test_a_withdrawn_series_goes_first_and_comes_back_as_it_was(archive: TinyArchive,
                                                                 tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0"):
        before = [_instance(mnt, SMALL, n).read_bytes() for n in range(1, SMALL.count + 1)]
        _instance(mnt, LARGE, 1).read_bytes()  # used later, so evicted later, if not...
        study, name = _instance(mnt, SMALL, 1).parent.parent, _instance(mnt, SMALL, 1).parent.name
        archive.withdraw(SMALL)
        assert name not in os.listdir(study)
        assert _last_access(cache_dir, uid(SMALL.key)) == {0.0}  # ...withdrawn: first
        assert _last_access(cache_dir, uid(LARGE.key)) != {0.0}
        assert [(w["series"], w["files"]) for w in _stats(cache_dir)["withdrawn"]] == \
            [(uid(SMALL.key), SMALL.count)]
        archive.submit(SMALL, "before", FIRST)  # back, the same bytes and timestamp
        reset_stats(servers.url)
        assert name in os.listdir(study)
        assert [_instance(mnt, SMALL, n).read_bytes()
                for n in range(1, SMALL.count + 1)] == before
        assert count_requests(servers.url, *IMAGE_ENDPOINTS) == 0  # served from the cache
        assert _stats(cache_dir)["withdrawn"] == []


@needs_fuse
@pytest.mark.mount
def test_the_series_of_a_withdrawn_patient_go_first(archive: TinyArchive,
                                                    tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    only = next(p for p in PLANS if p.key == "mr-e")  # its patient's one series
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0"):
        for n in range(1, only.count + 1):  # all in: no fetch of it still under way
            _instance(mnt, only, n).read_bytes()
        patient = _instance(mnt, only, 1).parents[2]
        archive.withdraw(only)  # and with it the patient, which has nothing left
        assert patient.name not in os.listdir(patient.parent)  # the collection, listed again
        assert _last_access(cache_dir, uid(only.key)) == {0.0}


def _last_access(cache_dir: Path, series: str) -> set[float]:
    """When the index says the series' cached files were last used (0: go first)."""
    with contextlib.closing(sqlite3.connect(cache_dir / "index.sqlite")) as db:
        return {t for t, in db.execute("SELECT last_access FROM instances WHERE series=? "
                                       "AND present=1", (series,))}


@needs_fuse
@pytest.mark.mount
def test_withdrawn_series_can_be_unpinned_and_cleared_with_no_mount(archive: TinyArchive,
                                                                    tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    pinned, single = uid(SMALL.key), uid(NOISY.key)
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--listing-ttl", "0", "--no-prefetch"):
        series = _instance(mnt, SMALL, 1).parent
        _cache_cli("pin", str(series))  # fetched whole, and pinned
        _instance(mnt, NOISY, 1).read_bytes()  # one file, fetched alone
        archive.withdraw(SMALL)
        archive.withdraw(NOISY)
        os.listdir(series.parent)  # the study, listed again
    assert {w["series"]: w["files"] for w in _stats(cache_dir)["withdrawn"]} == \
        {pinned: SMALL.count, single: 1}
    at = ("--cache-dir", str(cache_dir))
    cleared = _cache_cli("clear", pinned, single, *at)
    assert f"{single}: dropped 1 files" in cleared
    assert f"{pinned}: dropped 0 files (pinned files are kept: unpin first)" in cleared
    _cache_cli("unpin", pinned, *at)
    assert f"{pinned}: dropped {SMALL.count} files" in _cache_cli("clear", pinned, *at)
    assert _stats(cache_dir)["entries"] == 0
    unknown = run_tciafs("cache", "clear", "1.2.3", *at, timeout=60)
    assert unknown.returncode == 1 and "1.2.3: no series with this UID" in unknown.stderr


def _cache_cli(*args: str) -> str:
    done = run_tciafs("cache", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _stats(cache_dir: Path) -> dict:
    done = run_tciafs("cache", "stats", "--json", "--cache-dir", str(cache_dir), timeout=60,
                      check=True)
    return json.loads(done.stdout)
