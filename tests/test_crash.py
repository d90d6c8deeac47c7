"""kill -9 of the daemon in the middle of downloads, again and again: nothing partial is
ever served, and every remount verifies clean."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cliutil import run_tciafs
from test_mount import _first_ct_series, _series_zip

from conftest import start_emulator
from mountutil import (
    IMAGE_ENDPOINTS,
    count_requests,
    lazy_unmount,
    mounted,
    needs_fuse,
    reset_stats,
    stats,
)

pytestmark = [needs_fuse, pytest.mark.mount]


@pytest.fixture(scope="module")
def slow_emulator(demo_data_dir: Path):
    # 4 MB/s per connection: a demo CT series takes seconds, so a kill lands mid-download.
    emu = start_emulator(demo_data_dir, "--profile", "demo", "--bandwidth", "4000000",
                         nlst=True)
    yield emu
    emu.stop()


def _wait_for_bytes(url: str, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while stats(url)["bytes_sent"] < at_least:
        assert time.monotonic() < deadline, "no download started"
        time.sleep(0.02)


def _verify(cache_dir: Path) -> subprocess.CompletedProcess:
    return run_tciafs("cache", "verify", "--cache-dir", str(cache_dir))


def _cached_files(series: Path) -> list[Path]:
    return [p for p in series.glob("*.dcm")
            if os.getxattr(p, "user.tcia.cached") == b"full"]


def test_kill_9_ten_times_mid_download(slow_emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    truth: dict[str, bytes] = {}
    served = 0
    for round_ in range(10):
        if round_ % 3 == 2:  # start over now and then, so that there is always more to fetch
            run_tciafs("cache", "clear", "--cache-dir", str(cache_dir), check=True)
        with mounted(slow_emulator, mnt, cache_dir) as daemon:
            series = _first_ct_series(mnt)
            if not truth:
                truth, _ = _series_zip(slow_emulator.url, series.name)
            # Whatever survived the previous kill must read back exactly.
            for path in _cached_files(series):
                assert path.read_bytes() == truth[path.name.removesuffix(".dcm")]
                served += 1
            if len(_cached_files(series)) == len(truth):
                continue
            before = stats(slow_emulator.url)["bytes_sent"]
            copier = subprocess.Popen(["cp", "-r", str(series), str(tmp_path / f"cp{round_}")],
                                      stderr=subprocess.DEVNULL)
            _wait_for_bytes(slow_emulator.url, before + 300_000)
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
            copier.wait(timeout=30)
            lazy_unmount(mnt)
        result = _verify(cache_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        shutil.rmtree(tmp_path / f"cp{round_}", ignore_errors=True)
    assert served > 0  # some rounds did find survivors to check
    with mounted(slow_emulator, mnt, cache_dir):
        series = _first_ct_series(mnt)
        assert not list((cache_dir / "tmp").iterdir())  # partial downloads cleared at start
        got = {p.name.removesuffix(".dcm"): p.read_bytes() for p in series.glob("*.dcm")}
        assert got == truth
    assert _verify(cache_dir).returncode == 0


def _damage(path: Path) -> None:
    """Overwrite the SQLite header, as a disk fault or a stray write would."""
    with path.open("r+b") as db:
        db.write(b"not a database, not any more" * 4)


@pytest.mark.parametrize("lost", ["damaged", "deleted", "emptied"])
def test_a_lost_index_is_rebuilt_from_the_cached_files(emulator, tmp_path: Path,
                                                        lost: str) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    index = cache_dir / "index.sqlite"
    with mounted(emulator, mnt, cache_dir):
        series = _first_ct_series(mnt)
        truth = {p.name: p.read_bytes() for p in sorted(series.glob("*.dcm"))}
        while len(_cached_files(series)) < len(truth):  # the prefetch finishes the rest
            time.sleep(0.05)
    cached = len(list(cache_dir.glob("objects/*/*")))  # sibling series were prefetched too
    if lost == "damaged":
        _damage(index)
        stats_cmd = run_tciafs("cache", "stats", "--cache-dir", str(cache_dir))
        assert stats_cmd.returncode == 1 and "the next mount sets it aside" in stats_cmd.stderr
        assert "Traceback" not in stats_cmd.stderr
    elif lost == "deleted":  # as someone tidying up, or trying to mend it, would
        for path in cache_dir.glob("index.sqlite*"):
            path.unlink()
    else:  # as a rebuild killed before its one transaction ended leaves it
        with contextlib.closing(sqlite3.connect(index)) as db, db:
            db.execute("DELETE FROM instances")
    with mounted(emulator, mnt, cache_dir):
        reset_stats(emulator.url)
        assert {p.name: p.read_bytes() for p in sorted(series.glob("*.dcm"))} == truth
        # Known complete again (its listing counts as many files): nothing to prefetch.
        run_tciafs("cache", "prefetch", str(series), check=True, timeout=60)
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0  # nothing fetched again
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert f"{cached} cached files" in log and "indexed again" in log
    assert (index.with_name("index.sqlite.damaged").exists()) == (lost == "damaged")
    checked = _verify(cache_dir)
    assert checked.returncode == 0, checked.stdout
    assert f"checked {cached} files: 0 bad, {cached} not yet confirmed" in checked.stdout


def test_a_damaged_catalog_is_set_aside_and_listed_again(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir):
        before = sorted(os.listdir(mnt))
    (catalog,) = cache_dir.glob("catalog-*.sqlite")
    _damage(catalog)
    run_tciafs("cache", "stats", "--cache-dir", str(cache_dir), check=True)  # the index is fine
    with mounted(emulator, mnt, cache_dir):
        assert sorted(os.listdir(mnt)) == before
    assert catalog.with_name(catalog.name + ".damaged").exists()
