"""Publishing a series' files in batches: each file fsynced before it is renamed and
indexed, several per worker-thread job; a kill in the middle of a batch leaves no row
without its whole file; the SOP UID read straight from a header's bytes agrees with
pydicom's reading."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
import trio
from cacheutil import _series, _sops, _truth, _with_cache
from cliutil import run_tciafs
from dicomutil import dicom_bytes
from test_crash import slow_emulator  # noqa: F401  (the fixture: 4 MB/s, kills land mid-ZIP)
from test_mount import _first_ct_series

from tciafs.cache import Cache, object_path
from tciafs.cache import store as store_module

from mountutil import lazy_unmount, mounted, needs_fuse, stats


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.840.113619.2.55.3.604688119.969.1268071029.320",
                                 "", "not/a uid\x01"])
def test_the_sop_uid_read_from_the_bytes_agrees_with_pydicom(implicit: bool, sop: str) -> None:
    data = dicom_bytes(sop, meta_sop="1.2.3.999", implicit=implicit)
    want = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get("SOPInstanceUID")
    plain = store_module._plain_sop(data)
    # Only a plain UID is read straight; anything else is left to pydicom.
    assert plain == (want if want and sop.replace(".", "").isdigit() else None)
    for cut in range(0, min(len(data), 1024)):  # a head cut anywhere: right, or unknown
        assert store_module.sop_in_head([data[:cut]]) in (None, want or None)


async def test_a_series_zip_is_fsynced_before_each_rename_a_batch_per_thread_job(
        emulator, client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsynced: list[str] = []
    renamed: list[tuple[str, bool]] = []  # (path renamed, whether fsynced before)
    jobs: list[int] = []  # files per worker-thread job
    real_fsync, real_rename, real_finish = os.fsync, os.rename, store_module._finish_files

    def fsync(fd: int) -> None:
        real_fsync(fd)
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))

    def rename(src: str | Path, dst: str | Path) -> None:
        renamed.append((str(src), str(src) in fsynced))
        real_rename(src, dst)

    def finish_files(batch: Sequence, root: Path) -> list[str]:
        jobs.append(len(batch))
        return real_finish(batch, root)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(store_module, "_finish_files", finish_files)
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=True)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sops = _sops(emulator.url, uid)
    truth = _truth(emulator.url, uid)

    async def body() -> None:
        with trio.fail_after(60):
            await cache.start_series_fetch("Demo-Lung CT_2024", uid).wait()

    await _with_cache(cache, body)
    assert cache.series_complete(uid)
    into_objects = [(src, synced) for src, synced in renamed if "/tmp/" in src]
    assert len(into_objects) == len(sops)
    assert all(synced for _, synced in into_objects)  # never renamed before its fsync
    assert sum(jobs) == len(sops) and max(jobs) > 1  # several files per thread job
    for sop in sops:
        assert object_path(cache.root, sop).read_bytes() == truth[sop]
        assert cache.md5_of(sop) == hashlib.md5(truth[sop]).hexdigest()
    cache.close()


def _rows_without_their_bytes(cache_dir: Path) -> list[str]:
    """Present rows of the index whose file is missing, of another size, or not the bytes
    whose MD5 the row gives: read from disk as the daemon left it, before any start."""
    with sqlite3.connect(cache_dir / "index.sqlite") as db:
        rows = db.execute("SELECT sop, size, md5 FROM instances WHERE present=1").fetchall()
    bad = []
    for sop, size, md5 in rows:
        path = object_path(cache_dir, sop)
        if (not path.exists() or path.stat().st_size != size
                or hashlib.md5(path.read_bytes()).hexdigest() != md5):
            bad.append(sop)
    return bad


@needs_fuse
@pytest.mark.mount
def test_kill_9_mid_batch_leaves_no_row_without_its_bytes(request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    emulator = request.getfixturevalue("slow_emulator")  # test_crash's, imported
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    rows_seen = 0
    for round_, after in enumerate((400_000, 900_000, 1_500_000)):
        run_tciafs("cache", "clear", "--cache-dir", str(cache_dir))
        with mounted(emulator, mnt, cache_dir) as daemon:
            series = _first_ct_series(mnt)
            before = stats(emulator.url)["bytes_sent"]
            copier = subprocess.Popen(["cp", "-r", str(series), str(tmp_path / f"cp{round_}")],
                                      stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while stats(emulator.url)["bytes_sent"] < before + after:
                assert time.monotonic() < deadline, "no download started"
                time.sleep(0.01)
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
            copier.wait(timeout=30)
            lazy_unmount(mnt)
        assert _rows_without_their_bytes(cache_dir) == []
        with sqlite3.connect(cache_dir / "index.sqlite") as db:
            rows_seen += db.execute("SELECT count(*) FROM instances WHERE present=1"
                                    ).fetchone()[0]
        checked = run_tciafs("cache", "verify", "--cache-dir", str(cache_dir))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert rows_seen > 0  # some kills came after files were published
