"""The disk cache against the emulator: bound, eviction, single flight, prefetch, crash."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import trio
from cliutil import run_tciafs, start_tciafs, status_json, status_text
from dicomutil import dicom_bytes

from tciafs.cache import META_SLACK, Cache, CacheFull, object_path
from tciafs.cache import store as cache_module
from tciafs.catalog import Kind, Node
from tciafs.control import Control
from tciafs.sources.nbia import NbiaSource

from mountutil import (
    count_requests,
    lazy_unmount,
    mounted,
    needs_fuse,
    reset_stats,
    set_faults,
    stats,
)

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


def _series(url: str) -> list[dict]:
    rows = httpx.get(f"{url}/nbia-api/services/v4/getSeries",
                     params={"Collection": "Demo-Lung CT_2024"}, timeout=30).json()
    return sorted(rows, key=lambda r: -r["ImageCount"])


def _sops(url: str, series_uid: str) -> list[str]:
    rows = httpx.get(f"{url}/nbia-api/services/v4/getSOPInstanceUIDs",
                     params={"SeriesInstanceUID": series_uid}, timeout=30).json()
    return [r["SOPInstanceUID"] for r in rows]


def _truth(url: str, series_uid: str, headers: dict[str, str] | None = None
           ) -> dict[str, bytes]:
    body = httpx.get(f"{url}/nbia-api/services/v4/getImage", headers=headers,
                     params={"SeriesInstanceUID": series_uid}, timeout=60).content
    out = {}
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        for name in zf.namelist():
            if name.endswith(".dcm"):
                data = zf.read(name)
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                out[ds.SOPInstanceUID] = data
    return out


def _disk_usage(root: Path) -> int:
    """Apparent bytes of files and directories, as `du -sb` counts them."""
    total = os.stat(root).st_size
    for dirpath, dirs, files in os.walk(root):
        for f in [*files, *dirs]:
            with contextlib.suppress(FileNotFoundError):  # evicted while we looked
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def _overhead(tmp_path: Path) -> int:
    """What an empty cache already counts against its bound: slack, databases, directories."""
    probe = Cache(tmp_path / "probe", 1 << 30, None)
    overhead = probe.used_bytes + META_SLACK
    probe.close()
    return overhead


@pytest.fixture
async def client(emulator):
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10) as c:
        yield c


@pytest.fixture
def damage(emulator):
    """Set the emulator's pcorrupt fault for one test, and clear every fault after it."""
    def set_(chance: float, *endpoints: str, seed: int | None = None) -> None:
        set_faults(emulator.url, pcorrupt=chance, endpoints=list(endpoints), seed=seed)
    yield set_
    set_faults(emulator.url)


def _verified(root: Path, series_uid: str) -> dict[str, int]:
    db = sqlite3.connect(root / "index.sqlite")
    try:
        return dict(db.execute("SELECT sop, verified FROM instances WHERE series=?",
                               (series_uid,)))
    finally:
        db.close()


async def _with_cache(cache: Cache, body) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await body()
        nursery.cancel_scope.cancel()


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


async def test_restart_reconciles_the_directory(emulator, client, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)

    async def body() -> None:
        for sop in sops[:3]:
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))

    await _with_cache(cache, body)
    sizes = {sop: cache.known_size(sop) for sop in sops[:3]}
    cache.db.close()  # as a crash would leave it: no orderly close
    (tmp_path / "c" / "tmp" / "partial-download").write_bytes(b"x" * 1000)
    orphan = object_path(tmp_path / "c", "1.2.3.orphan")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"y" * 1000)
    object_path(tmp_path / "c", sops[0]).unlink()  # indexed, but its file is gone
    with open(object_path(tmp_path / "c", sops[1]), "r+b") as f:
        f.truncate(100)  # indexed, but cut short

    again = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    assert not again.is_cached(sops[0]) and not again.is_cached(sops[1])
    assert again.is_cached(sops[2])
    assert not orphan.exists()
    assert not list((tmp_path / "c" / "tmp").iterdir())
    assert again.known_size(sops[0]) == sizes[sops[0]]  # sizes outlive the bytes
    assert again.used_bytes == _disk_usage(tmp_path / "c")
    again.close()


def test_cache_files_are_private(emulator, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, None)
    for path in [tmp_path / "c", *(tmp_path / "c").rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path
    cache.close()


async def test_verify_command_reports_a_corrupted_file(emulator, client,
                                                      tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)[:2]

    async def body() -> None:
        for sop in sops:
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))

    await _with_cache(cache, body)
    cache.close()
    verify = ("cache", "verify", "--cache-dir", str(tmp_path / "c"))
    ok = run_tciafs(*verify)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "checked 2 files: 0 bad" in ok.stdout
    path = object_path(tmp_path / "c", sops[1])
    good = path.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    bad = run_tciafs(*verify)
    assert bad.returncode == 1
    assert f"{sops[1]}: MD5 mismatch" in bad.stdout
    first = object_path(tmp_path / "c", sops[0])
    size = first.stat().st_size
    os.truncate(first, size - 1)
    worse = run_tciafs(*verify)
    assert f"{sops[0]}: size {size - 1} != {size}" in worse.stdout
    first.unlink()
    assert f"{sops[0]}: missing" in run_tciafs(*verify).stdout
    with open(tmp_path / "c" / "lock", "a") as lock:  # as a running mount holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        refused = run_tciafs(*verify, "--repair")
    assert refused.returncode == 1 and f"{sops[1]}: MD5 mismatch" in refused.stdout
    assert "not repaired: cache directory" in refused.stdout and "unmount" in refused.stdout
    repair = run_tciafs(*verify, "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "repaired: 2 bad files dropped" in repair.stdout
    after = run_tciafs(*verify)
    assert after.returncode == 0 and "checked 0 files: 0 bad" in after.stdout
    stats = json.loads(_cli("stats", "--json", "--cache-dir", str(tmp_path / "c")).stdout)
    assert stats["bound"] == 1 << 30  # the command kept the cache's own bound
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)

    async def read_again() -> None:  # the damaged one is fetched anew, right this time
        entry = await cache.acquire("Demo-Lung CT_2024", uid, sops[1])
        assert Path(entry.path).read_bytes() == good
        cache.release(entry)

    await _with_cache(cache, read_again)
    cache.close()


@needs_fuse
@pytest.mark.mount
def test_verify_repairs_a_mounted_cache_through_its_mount(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    verify = ["verify", "--repair", "--cache-dir", str(cache_dir)]
    with mounted(emulator, mnt, cache_dir, "--no-prefetch"):  # no sibling series fetched
        series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
        assert _cli("prefetch", str(series)).returncode == 0  # nothing opened: no pages
        held, other = sorted(series.glob("*.dcm"))[:2]
        for path in (held, other):
            damaged = bytearray(truth[path.stem])
            damaged[-1] ^= 0xFF
            object_path(cache_dir, path.stem).write_bytes(bytes(damaged))
        with held.open("rb") as reader:  # open files stay: their readers hold their pages
            first = _cli(*verify)
            assert first.returncode == 1, first.stdout + first.stderr
            assert "repaired: 1 bad files dropped" in first.stdout
            assert "1 are open now" in first.stdout
            assert reader.read() != truth[held.stem]
        reset_stats(emulator.url)
        assert other.read_bytes() == truth[other.stem]
        second = _cli(*verify)
        assert second.returncode == 0 and "repaired: 1 bad files dropped" in second.stdout
        assert held.read_bytes() == truth[held.stem]  # the kernel's copy went too
        assert stats(emulator.url)["requests"] == {"getSingleImage": 2}
        assert _cli("verify", "--cache-dir", str(cache_dir)).returncode == 0
    assert set(_verified(cache_dir, uid).values()) == {1}


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


@pytest.mark.unit
def test_finished_prefetch_jobs_are_forgotten_beyond_the_last_twenty(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", 100 << 20)
    control = Control(tree=None, cache=cache)  # type: ignore[arg-type]  # unused here
    cache._mark_complete("done", "C")
    for uid in ("running", "failing"):  # fetches under way: a job does not restart them
        cache._series_tasks[uid] = trio.Event()

    def series(uid: str) -> Node:
        return Node(0, 0, uid, Kind.SERIES, uid, "C", uid)

    running = control._start_job("/m/running", [series("running")])
    failing = control._start_job("/m/failing", [series("failing")])
    ids = [control._start_job(f"/m/{i}", [series("done")]) for i in range(40)]
    assert list(control.jobs) == [running, failing, *ids[-20:]]  # unfinished jobs stay
    cache.failed_series["failing"] = "503"  # now it has ended, if badly
    ids.append(control._start_job("/m/last", [series("done")]))
    assert list(control.jobs) == [running, *ids[-20:]]
    assert control.progress()[str(running)]["series_done"] == 0
    cache.close()


@pytest.mark.unit
@pytest.mark.parametrize("implicit", [False, True])
def test_a_finished_file_is_named_by_its_dataset_and_hashed_as_stored(
        tmp_path: Path, implicit: bool) -> None:
    path = tmp_path / "download"
    data = dicom_bytes("1.2.3.4", meta_sop="1.2.3.999", implicit=implicit, study_date="20240102")
    path.write_bytes(data)
    (tmp_path / "root" / "objects").mkdir(parents=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        sop, md5 = cache_module._finish_file(fd, path, tmp_path / "root")
    finally:
        os.close(fd)
    assert (sop, md5) == ("1.2.3.4", hashlib.md5(data).hexdigest())  # the dataset's UID wins
    assert object_path(tmp_path / "root", sop).parent.is_dir()  # ready for the rename


@pytest.mark.unit
def test_a_file_whose_dataset_lacks_the_uid_is_named_by_its_meta_header(tmp_path: Path) -> None:
    path = tmp_path / "download"
    path.write_bytes(dicom_bytes("", meta_sop="1.2.3.5", study_date="20240102"))
    with open(path, "rb") as stored:
        assert cache_module._instance_uids(stored, series_too=False)[0] == "1.2.3.5"


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A tmpfs of the given size: a disk that fills up for reasons outside the cache."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_prefetch_job_waits_out_an_outage(emulator, tmp_path: Path) -> None:
    """A series that failed because the service did (503 here; a network gone the same)
    is fetched again later; one the service refuses (an unknown UID) fails at once."""
    uid, other = (row["SeriesInstanceUID"] for row in _series(emulator.url)[2:4])

    def series(ident: str) -> Node:
        return Node(0, 0, ident, Kind.SERIES, ident, "Demo-Lung CT_2024", ident)

    async def progress(control: Control, job: int, until) -> dict:  # noqa: ANN001
        with trio.fail_after(30):
            while not until(doc := control.progress()[str(job)]):
                await trio.sleep(0.05)
        return doc

    set_faults(emulator.url, p503=1.0, endpoints=["getImage"])
    try:
        async with (NbiaSource(emulator.url, nlst_server=None, timeout=10,
                               retries=0) as client, trio.open_nursery() as nursery):
            cache = Cache(tmp_path / "c", 1 << 30, client)
            patient = Control(tree=None, cache=cache, retry_first=0.3,  # type: ignore[arg-type]
                              retry_max=0.6, retry_for=60)
            await nursery.start(cache.run)
            await nursery.start(patient.run_jobs)
            job = patient._start_job("t", [series(uid), series(other)])
            doc = await progress(patient, job, lambda d: d["series_waiting"] == 2)
            assert doc["series_failed"] == 0 and "503" in doc["waiting_reason"]
            assert doc["retry_at"] is not None
            first = dict(patient.jobs[job].fetches)
            # One series goes first; while it fails again, the other is not asked for.
            with trio.fail_after(30):
                while patient.jobs[job].fetches[uid] is first[uid] or patient._state(
                        patient.jobs[job], uid) != "waiting":
                    await trio.sleep(0.05)
            assert patient.jobs[job].fetches[other] is first[other]
            set_faults(emulator.url)  # the service is back
            doc = await progress(patient, job, lambda d: d["series_done"] == 2)
            assert doc["series_waiting"] == 0 and cache.series_complete(other)

            job = patient._start_job("t", [series("1.2.840.99.1")])  # no such series
            doc = await progress(patient, job, lambda d: d["series_failed"] == 1)
            assert doc["series_waiting"] == 0

            set_faults(emulator.url, p503=1.0, endpoints=["getImage"])
            cache.clear(uid)
            hasty = Control(tree=None, cache=cache, retry_first=0.3,  # type: ignore[arg-type]
                            retry_for=0.1)
            hasty._nursery = patient._nursery
            job = hasty._start_job("t", [series(uid)])
            doc = await progress(hasty, job, lambda d: d["series_failed"] == 1)
            assert doc["series_waiting"] == 0  # out of patience: failed for good
            nursery.cancel_scope.cancel()
        cache.close()
    finally:
        set_faults(emulator.url)


async def test_a_job_starts_its_series_a_few_at_a_time(emulator, client,
                                                      tmp_path: Path) -> None:
    """A task per series waiting its turn costs about 4 kB: a job of 200,000 series would
    hold 800 MB before fetching anything."""
    from tciafs import control as control_module

    cache = Cache(tmp_path / "c", 1 << 30, client)
    control = Control(tree=None, cache=cache)  # type: ignore[arg-type]  # unused here
    series = [Node(0, 0, f"1.2.840.99.{n}", Kind.SERIES, f"1.2.840.99.{n}",
                   "Demo-Lung CT_2024", f"1.2.840.99.{n}") for n in range(60)]
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await nursery.start(control.run_jobs)
        slots = [object() for _ in range(4)]
        for slot in slots:  # every fetch started waits for its turn
            await cache._series_limiter.acquire_on_behalf_of(slot)
        job = str(control._start_job("t", series))
        await trio.sleep(0.2)
        assert len(cache._series_tasks) == control_module.JOB_WINDOW
        for slot in slots:
            cache._series_limiter.release_on_behalf_of(slot)
        with trio.fail_after(60):  # unknown series fail at once, the rest follow in turn
            while control.progress()[job]["series_failed"] < len(series):
                assert len(cache._series_tasks) <= control_module.JOB_WINDOW
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    cache.close()


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_left_by_a_killed_daemon_goes_on_at_the_next_mount(emulator,
                                                                      tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    set_faults(emulator.url, bandwidth=1_000_000, endpoints=["getImage"])  # 21 MB: ~20 s
    try:
        with mounted(emulator, mnt, cache_dir) as daemon:
            series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
            target = str(series.relative_to(mnt))
            assert _cli("prefetch", "--no-wait", str(series)).returncode == 0
            deadline = time.monotonic() + 30
            while not _present(cache_dir, series):  # under way
                assert time.monotonic() < deadline
                time.sleep(0.1)
            daemon.kill()  # a crash, an OOM kill, a reboot
            daemon.wait()
            lazy_unmount(mnt)
    finally:
        set_faults(emulator.url)
    left = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert [(j["command"], j["target"]) for j in left["unfinished_jobs"]] == [
        ("prefetch", target)]
    assert f"prefetch  {target}  (since " in _cli("stats", "--cache-dir", str(cache_dir)).stdout
    count = len(_truth(emulator.url, uid))
    with mounted(emulator, mnt, cache_dir):  # nobody asks again: the mount goes on by itself
        deadline = time.monotonic() + 60
        while _present(cache_dir, series) < count:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        jobs = status_json(mnt)["jobs"]
        assert [j["target"] for j in jobs.values()] == [target]
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert f"prefetch of {target}, left unfinished by the last mount, goes on" in log
    with mounted(emulator, mnt, cache_dir):  # it ended: nothing to take up any more
        status = status_json(mnt)
        assert status["jobs"] == {}
    left = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert left["unfinished_jobs"] == []


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("what", ["the series", "its UID", "everything",
                                  "the series, unmounted", "everything, unmounted"])
def test_clear_ends_a_prefetch_for_good(emulator, tmp_path: Path, what: str) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    set_faults(emulator.url, bandwidth=1_000_000, endpoints=["getImage"])
    try:
        with mounted(emulator, mnt, cache_dir):
            series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
            assert _cli("prefetch", "--no-wait", str(series)).returncode == 0
            if not what.endswith("unmounted"):
                named = {"the series": [str(series)], "its UID": [uid]}.get(what, [])
                # A job started by path, ended by UID too. --mount: other mounts may run
                # on this machine (the demo), and "everything" means all of theirs too.
                clear = _cli("clear", "--mount", str(mnt), *named)
                assert clear.returncode == 0, clear.stderr
        if what.endswith("unmounted"):  # the job was cut short: stored for the next mount
            clear = _cli("clear", "--cache-dir", str(cache_dir),
                         *([uid] if what.startswith("the series") else []))
            assert clear.returncode == 0, clear.stderr
    finally:
        set_faults(emulator.url)
    with mounted(emulator, mnt, cache_dir):
        status = status_json(mnt)
        assert status["jobs"] == {}
    assert "left unfinished by the last mount" not in (tmp_path / "mnt-daemon.log").read_text()


@contextlib.contextmanager
def _slow_prefetch(emulator, mnt: Path, cache_dir: Path  # noqa: ANN001
                   ) -> Iterator[subprocess.Popen]:
    """`cache prefetch` of the largest lung series at 500 kB/s (21 MB: about 40 s),
    yielded once under way."""
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
    set_faults(emulator.url, bandwidth=500_000)
    try:
        follower = start_tciafs("cache", "prefetch", str(series), stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 30
        while not _present(cache_dir, series):
            assert time.monotonic() < deadline and follower.poll() is None
            time.sleep(0.1)
        yield follower
    finally:
        set_faults(emulator.url)


@needs_fuse
@pytest.mark.mount
def test_ctrl_c_stops_following_a_prefetch_not_the_prefetch(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir), _slow_prefetch(emulator, mnt, cache_dir) as cli:
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
        assert "goes on in the mount" in err and "tciafs cache clear" in err
        assert "Traceback" not in err
        status = status_json(mnt)
        assert status["in_flight"]  # still fetching


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_whose_mount_goes_away_says_so(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir), _slow_prefetch(emulator, mnt, cache_dir) as cli:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1, err
    assert "the mount went away while" in err and "Traceback" not in err


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_the_cache_cannot_hold_ends_with_the_reason(emulator, tmp_path: Path) -> None:
    """Before, such a job evicted its own first series to fetch its last ones and never
    ended: `cache prefetch` waited forever."""
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir, "--cache-size", "30M"):
        lung = mnt / "Demo-Lung CT_2024"
        reset_stats(emulator.url)
        whole = _cli("prefetch", str(lung))  # 46 MB
        assert whole.returncode == 1
        assert "larger than the cache can hold (its bound is 30.0 MiB)" in whole.stderr
        assert "getImage" not in stats(emulator.url)["requests"]
        assert _cli("pin", str(mnt / "Demo_PET-CT Lymphoma")).returncode == 0  # 11 MB stay
        crowded = _cli("prefetch", str(lung / "LUNG-001"))  # 21 MB: not beside the pinned
        assert crowded.returncode == 1, crowded.stderr
        assert re.search(r"[12] of 2 series were fetched but did not stay", crowded.stderr)
        text = status_text(mnt)
        assert ", 0 running" in text
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert "evicted, as the cache cannot hold it beside the data in use" in log


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_a_full_disk_evicts_and_retries_then_fails_clearly(emulator, client,
                                                                  tmp_path: Path) -> None:
    target = _series(emulator.url)[0]
    uid = target["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    sops = _sops(emulator.url, uid)
    with _small_disk(tmp_path / "disk", "4m") as disk:
        # The bound is far above the disk: only the file system can say "full".
        cache = Cache(disk / "c", 1 << 30, client, prefetch=False)

        async def body() -> None:
            for sop in sops[:12]:  # about twice what the disk holds
                entry = await cache.acquire("Demo-Lung CT_2024", uid, sop)
                assert Path(entry.path).read_bytes() == truth[sop]
                cache.release(entry)
            assert cache.stats.evictions > 0
            held = []
            with pytest.raises(CacheFull, match="disk full"):
                for sop in sops[:12]:  # held open, nothing can go: a clear error at last
                    held.append(await cache.acquire("Demo-Lung CT_2024", uid, sop))
            for entry in held:
                assert Path(entry.path).read_bytes() == truth[entry.sop]
                cache.release(entry)

        await _with_cache(cache, body)
        assert not list((disk / "c" / "tmp").iterdir())  # no partial download is left
        for path in (disk / "c" / "objects").glob("*/*"):  # and every stored file is whole
            assert path.read_bytes() in truth.values()
        cache.close()


@needs_fuse
@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_cache_disk_that_refuses_writes_is_a_clear_error(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    with mounted(emulator, mnt, cache_dir, "--no-prefetch"):
        first, second = sorted(next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}")).glob("*.dcm"))[:2]
        cached = first.read_bytes()
        # Downloads land in tmp/ first: made read-only, as a disk that failed would be.
        tmp = cache_dir / "tmp"
        subprocess.run(["mount", "--bind", str(tmp), str(tmp)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(tmp)], check=True)
            for _ in range(3):
                with pytest.raises(OSError) as err:
                    second.read_bytes()
                assert err.value.errno == errno.EIO
            assert first.read_bytes() == cached  # what is cached still reads
        finally:
            subprocess.run(["umount", str(tmp)], check=True)
        assert second.read_bytes() == _truth(emulator.url, uid)[second.stem]  # mended
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert log.count("cannot be written: Read-only file system") == 1, log  # once, clearly
    assert "Traceback" not in log


def _leave_free(disk: Path, room: int) -> None:
    """Fill the disk with a file of its own until only `room` bytes (whole pages) are free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    info = os.statvfs(disk)
    free, page = info.f_bavail * info.f_frsize, info.f_frsize
    filler.write_bytes(b"\0" * (free - (room + page - 1) // page * page))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_an_index_that_cannot_grow_makes_room_then_fails_clearly(emulator, client,
                                                                       tmp_path: Path) -> None:
    target = _series(emulator.url)[0]
    uid = target["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    first, second, third = _sops(emulator.url, uid)[:3]
    with _small_disk(tmp_path / "disk", "8m") as disk:
        cache = Cache(disk / "c", 1 << 30, client, prefetch=False)

        async def body() -> None:
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, first))
            # Room for the second file's bytes, none for its row in the index.
            _leave_free(disk, len(truth[second]))
            held = await cache.acquire("Demo-Lung CT_2024", uid, second)
            assert Path(held.path).read_bytes() == truth[second]
            assert not cache.is_cached(first)  # evicted so that the index could grow
            _leave_free(disk, len(truth[third]))
            with pytest.raises(CacheFull, match="index cannot grow; every cached file is open"):
                await cache.acquire("Demo-Lung CT_2024", uid, third)
            cache.release(held)

        await _with_cache(cache, body)
        assert not cache.is_cached(third)
        assert not list((disk / "c" / "tmp").iterdir())
        assert sorted(p.read_bytes() for p in (disk / "c" / "objects").glob("*/*")) == \
            [truth[second]]  # the file that could not be indexed is not left behind
        cache.close()


async def test_files_damaged_in_a_series_zip_are_fetched_again_and_verified(
        emulator, client, damage, tmp_path: Path) -> None:
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    damage(0.3, "getImage", seed=5)  # a third of the ZIP's images; single images are sound
    reset_stats(emulator.url)
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)

    async def body() -> None:
        with trio.fail_after(120):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        assert cache.series_complete(uid)
        for sop, data in truth.items():
            assert object_path(tmp_path / "c", sop).read_bytes() == data

    await _with_cache(cache, body)
    seen = stats(emulator.url)
    assert 0 < seen["faults"]["corrupt"] < len(truth)
    assert cache.stats.md5_mismatches == seen["faults"]["corrupt"]
    assert seen["requests"]["getSingleImage"] == seen["faults"]["corrupt"]  # each once again
    assert seen["requests"]["getImage"] == 1  # not the whole series again
    cache.close()
    assert _verified(tmp_path / "c", uid) == dict.fromkeys(truth, 1)


async def test_files_the_service_stores_damaged_are_never_served(
        emulator, client, damage, tmp_path: Path) -> None:
    uid = min(_series(emulator.url), key=lambda r: r["ImageCount"])["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    sops = sorted(truth)
    damage(1.0, "getImage", "getSingleImage")  # every copy it sends is bad
    reset_stats(emulator.url)
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)

    async def body() -> None:
        with trio.fail_after(120):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        assert not cache.series_complete(uid)
        assert "failed it again" in cache.failed_series[uid]
        assert cache.cached_count(uid) == 0
        refetched = stats(emulator.url)["requests"]["getSingleImage"]
        assert refetched == min(3, len(sops)) * cache.attempts  # then it stops trying
        # A reader gets an error, checked against the list: not the damaged bytes.
        with trio.fail_after(60), pytest.raises(cache_module.FetchFailed, match="MD5"):
            await cache.acquire("Demo-Lung CT_2024", uid, sops[-1])
        assert not cache.is_cached(sops[-1])
        damage(0.0)  # the service mends its copy: the same read now succeeds, verified
        with trio.fail_after(60):
            entry = await cache.acquire("Demo-Lung CT_2024", uid, sops[-1])
        cache.release(entry)
        assert Path(entry.path).read_bytes() == truth[sops[-1]]

    await _with_cache(cache, body)
    cache.close()
    assert _verified(tmp_path / "c", uid) == {sops[-1]: 1}


async def test_a_file_fetched_again_alone_is_checked_against_the_md5_listed_before(
        emulator, client, damage, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False, attempts=2)
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    sop = _sops(emulator.url, uid)[0]

    async def body() -> None:
        await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()
        cache.clear(uid)  # evicted; the index keeps what the service's list confirmed
        damage(1.0, "getSingleImage")
        with pytest.raises(cache_module.FetchFailed, match="MD5"):
            await cache.acquire("Demo-Lung CT_2024", uid, sop)
        damage(0.0)
        entry = await cache.acquire("Demo-Lung CT_2024", uid, sop)
        cache.release(entry)

    await _with_cache(cache, body)
    cache.close()
    assert _verified(tmp_path / "c", uid)[sop] == 1


@needs_fuse
@pytest.mark.mount
def test_a_persistent_md5_mismatch_is_eio_through_the_mount(emulator, damage,
                                                            tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    uid = min(_series(emulator.url), key=lambda r: r["ImageCount"])["SeriesInstanceUID"]
    with mounted(emulator, mnt, tmp_path / "cache"):
        series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
        damage(1.0, "getImage", "getSingleImage")
        prefetch = run_tciafs("cache", "prefetch", str(series), timeout=120)
        assert prefetch.returncode == 1
        assert "MD5" in prefetch.stdout + prefetch.stderr
        first = sorted(series.glob("*.dcm"))[0]
        with pytest.raises(OSError) as err:
            first.read_bytes()
        assert err.value.errno == errno.EIO
        damage(0.0)
        assert first.read_bytes() == _truth(emulator.url, uid)[first.name.removesuffix(".dcm")]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_tciafs("cache", *args, timeout=120)


def _present(cache_dir: Path, series: Path) -> int:
    """How many of the series' files the cache holds."""
    return sum(object_path(cache_dir, p.name.removesuffix(".dcm")).exists()
               for p in series.glob("*.dcm"))


def _read_all(series: Path) -> None:
    for path in sorted(series.glob("*.dcm")):
        path.read_bytes()


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("harm", ["deleted", "cut short"])
def test_cached_files_harmed_from_outside_are_fetched_again(emulator, tmp_path: Path,
                                                            harm: str) -> None:
    """A cached file deleted (a cleaner of old files in /tmp) or cut short (a copy or a
    restore of the cache dir that ran out of room) is fetched again, never served short."""
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    with mounted(emulator, mnt, cache_dir):
        series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
        files = sorted(series.glob("*.dcm"))
        files[0].read_bytes()  # the series is fetched whole
        deadline = time.monotonic() + 60
        while _present(cache_dir, series) < len(files):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        last = files[-1]  # never opened, nor pushed ahead into the kernel's page cache
        if harm == "deleted":
            object_path(cache_dir, last.stem).unlink()
            shutil.rmtree(cache_dir / "tmp")  # a cleaner takes old, empty directories too
        else:
            os.truncate(object_path(cache_dir, last.stem), len(truth[last.stem]) // 2)
        reset_stats(emulator.url)
        assert last.read_bytes() == truth[last.stem]
        assert stats(emulator.url)["requests"] == {"getSingleImage": 1}  # that file alone
        assert os.path.getsize(object_path(cache_dir, last.stem)) == len(truth[last.stem])
        pages = status_json(mnt)["page_cache"]
        assert pages["failed"] == 0 and pages["reads_through_daemon"] == 0, pages  # at open
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert f"{harm} from outside the mount" in log and "Traceback" not in log


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


@needs_fuse
@pytest.mark.mount
def test_pin_unpin_stats_clear_and_a_resumed_prefetch(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir, "--cache-size", "30M"):
        lung = mnt / "Demo-Lung CT_2024"
        pinned, big, other = (next(lung.glob(f"{patient}/*/*")) for patient in
                              ("LUNG%2F003", "LUNG-001", "LUNG 002"))
        big = max(big.parent.iterdir(), key=lambda s: len(list(s.iterdir())))  # 21 MB
        count = len(list(pinned.glob("*.dcm")))
        pin = _cli("pin", str(pinned))
        assert pin.returncode == 0, pin.stderr
        assert "(1/1 series)" in pin.stderr and "ETA" in pin.stderr
        assert _present(cache_dir, pinned) == count
        stats_text = _cli("stats", "--cache-dir", str(cache_dir)).stdout
        assert f"({count} pinned)" in stats_text and "of 30.0 MiB" in stats_text
        unknown = _cli("pin", "--mount", str(mnt), "1.2.3.4.5")
        assert unknown.returncode == 1 and "no study or series with this UID is listed" in (
            unknown.stderr)
        unknown = _cli("pin", str(lung / "nobody"))
        assert unknown.returncode == 1 and unknown.stderr.endswith("nobody: no such entry\n")

        _read_all(big)
        _read_all(other)  # 38 MB through a 30 MB cache: evictions, but not the pinned
        assert _present(cache_dir, pinned) == count
        set_faults(emulator.url, p503=1.0)  # the service is down: pinned data still reads
        try:
            reset_stats(emulator.url)
            for path in pinned.glob("*.dcm"):
                assert path.read_bytes()[128:132] == b"DICM"
            assert stats(emulator.url)["requests_total"] == 0
        finally:
            set_faults(emulator.url)
        doc = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
        assert doc["mounted_at"] == str(mnt) and doc["hits"] >= count  # the mount's own

        assert _cli("unpin", str(pinned)).returncode == 0
        assert "(0 pinned)" in _cli("stats", "--cache-dir", str(cache_dir)).stdout
        _read_all(big)
        _read_all(other)  # now the least recently used, it is evicted first
        assert _present(cache_dir, pinned) < count

        assert _present(cache_dir, other) > 0
        assert _cli("clear", str(other)).returncode == 0
        assert _present(cache_dir, other) == 0

        brain = mnt / "Demo MR-Brain_2023"
        assert _cli("prefetch", str(brain)).returncode == 0
        every = [s for s in brain.glob("*/*/*") if s.is_dir()]
        assert all(_present(cache_dir, s) == len(list(s.glob("*.dcm"))) for s in every)
        assert _cli("clear", str(every[0])).returncode == 0
        reset_stats(emulator.url)
        again = _cli("prefetch", str(brain))  # resumed: only what is missing is fetched
        assert again.returncode == 0, again.stderr
        assert stats(emulator.url)["requests"].get("getImage") == 1
        assert _present(cache_dir, every[0]) == len(list(every[0].glob("*.dcm")))


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


async def test_a_long_rebuild_of_the_index_keeps_telling_it_is_starting(
        emulator, client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)

    async def body() -> None:
        for sop in _sops(emulator.url, uid)[:3]:
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))

    await _with_cache(cache, body)
    cache.close()
    for path in (tmp_path / "c").glob("index.sqlite*"):
        path.unlink()
    monkeypatch.setattr(cache_module, "REINDEX_REPORT_EVERY", 0.0)  # as if each file were slow
    ticks: list[float] = []
    rebuilt = Cache(tmp_path / "c", 1 << 30, client, still_starting=lambda: ticks.append(1))
    try:
        assert rebuilt.entries == 3 and len(ticks) == 3
    finally:
        rebuilt.close()


async def test_stats_of_a_cache_in_use_show_recent_hits(emulator, client,
                                                        tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sop = _sops(emulator.url, uid)[0]

    async def body() -> None:
        for _ in range(300):  # one miss, then hits, while the cache stays open
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))

    await _with_cache(cache, body)
    seen = _cli("stats", "--json", "--cache-dir", str(tmp_path / "c"))
    doc = json.loads(seen.stdout)
    assert doc["misses"] == 1 and 255 <= doc["hits"] <= 299, doc
    cache.close()
    doc = json.loads(_cli("stats", "--json", "--cache-dir", str(tmp_path / "c")).stdout)
    assert doc["hits"] == 299
    du = subprocess.run(["du", "-sb", str(tmp_path / "c")], capture_output=True, text=True,
                        check=True).stdout.split()[0]
    assert doc["used"] == int(du)  # what the bound counts: files, databases, directories
