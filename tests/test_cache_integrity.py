"""The MD5 lists and the integrity of cached files: `tciafs cache verify` and its repair,
of a cache at rest and of one in use by a mount; how a finished download is named and
hashed; files damaged on the way or stored damaged by the service, checked against the
service's MD5 list and never served; a series re-submitted to the service."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest
import trio
from cacheutil import _cli, _series, _sops, _truth, _verified, _with_cache
from cliutil import run_tciafs
from dicomutil import dicom_bytes

from tciafs.cache import Cache, object_path
from tciafs.cache import store as cache_module

from mountutil import mounted, needs_fuse, reset_stats, stats

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


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


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("chunk", [1000, 40_000])  # the header across chunks, or in one
async def test_a_finished_file_is_named_by_its_dataset_and_hashed_as_stored(
        tmp_path: Path, implicit: bool, chunk: int) -> None:
    data = dicom_bytes("1.2.3.4", meta_sop="1.2.3.999", implicit=implicit, study_date="20240102")
    cache = Cache(tmp_path / "root", 1 << 30, None)
    try:
        with cache.space.reservation("series", None) as room:
            tmp = cache.store.tmpfile(room, hashed=True)
            try:
                for start in range(0, len(data), chunk):
                    await tmp.write(data[start:start + chunk])
                (sop, md5), = await cache.store.finish_all([tmp])
                assert tmp.path.read_bytes() == data
            finally:
                tmp.discard()
    finally:
        cache.close()
    assert (sop, md5) == ("1.2.3.4", hashlib.md5(data).hexdigest())  # the dataset's UID wins
    assert object_path(tmp_path / "root", sop).parent.is_dir()  # ready for the rename


@pytest.mark.unit
def test_a_file_whose_dataset_lacks_the_uid_is_named_by_its_meta_header(tmp_path: Path) -> None:
    path = tmp_path / "download"
    path.write_bytes(dicom_bytes("", meta_sop="1.2.3.5", study_date="20240102"))
    with open(path, "rb") as stored:
        assert cache_module._instance_uids(stored, series_too=False)[0] == "1.2.3.5"


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
