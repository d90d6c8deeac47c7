"""Crash safety and damage from outside: the cache directory reconciled after a crash and
its index rebuilt; files kept private; a full disk, a disk that refuses writes and an
index that cannot grow, each a clear error; cached files deleted or cut short from
outside, fetched again."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cacheutil import _disk_usage, _present, _series, _small_disk, _sops, _truth, _with_cache
from cliutil import status_json

from tciafs.cache import Cache, CacheFull, object_path
from tciafs.cache import store as cache_module

from mountutil import mounted, needs_fuse, reset_stats, stats

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


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
