"""Warm reads come from pages pushed into the kernel ahead of the reader, and stay exact."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cliutil import status_json, status_text
from test_mount import _first_ct_series, _series_zip

from tciafs import pagepush

from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

DROP_CACHES = "/proc/sys/vm/drop_caches"


def _warm_cache(emulator, mnt: Path, cache: Path) -> tuple[Path, dict[str, bytes]]:
    """Read a CT series once through a mount, so that the next mount finds it cached."""
    with mounted(emulator, mnt, cache):
        series = _first_ct_series(mnt)
        truth, _ = _series_zip(emulator.url, series.name)
        for f in sorted(series.glob("*.dcm")):
            f.read_bytes()
    return series, truth


def test_series_read_in_order_never_reaches_the_daemon(emulator, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    series, truth = _warm_cache(emulator, mnt, cache)
    with mounted(emulator, mnt, cache):
        files = sorted(series.glob("*.dcm"))
        out = subprocess.run(["cat", *map(str, files)], capture_output=True, check=True,
                             timeout=60).stdout
        assert out == b"".join(truth[f.name.removesuffix(".dcm")] for f in files)
        pages = status_json(mnt)["page_cache"]
        assert pages["pushed_at_open"] + pages["pushed_ahead"] == len(files), pages
        assert pages["pushed_ahead"] >= len(files) // 2, pages
        assert pages["failed"] == 0 and pages["reads_through_daemon"] == 0, pages
        text = status_text(mnt)
        assert "ahead of the reader" in text


def _reader(files: list[Path], truth: dict[str, bytes], seed: int, rounds: int,
            errors: list[str]) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        order = files[:]
        rng.shuffle(order)
        for f in order:
            want = truth[f.name.removesuffix(".dcm")]
            try:
                with open(f, "rb") as fh:
                    if rng.random() < 0.3:  # page faults take the kernel's other path
                        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                            got = bytes(m)
                    else:
                        got = fh.read()
            except OSError as exc:
                errors.append(f"{f.name}: {exc}")
                return
            if got != want:
                errors.append(f"{f.name}: {len(got)} bytes differ from the service's")
                return


def test_concurrent_and_mapped_readers_get_exact_bytes(emulator, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    series, truth = _warm_cache(emulator, mnt, cache)
    with mounted(emulator, mnt, cache):
        files = sorted(series.glob("*.dcm"))
        errors: list[str] = []
        threads = [threading.Thread(target=_reader, args=(files, truth, seed, 3, errors))
                   for seed in range(8)]
        for t in threads:
            t.start()
        if os.access(DROP_CACHES, os.W_OK):
            # Pushes then read from disk first, while other handles are open.
            for _ in range(3):
                time.sleep(0.3)
                Path(DROP_CACHES).write_text("3\n")
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a reader hung"
        assert errors == []
        pages = status_json(mnt)["page_cache"]
        assert pages["failed"] == 0, pages


def test_sigterm_while_pages_are_pushed_exits_cleanly(emulator, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    series, truth = _warm_cache(emulator, mnt, cache)
    with mounted(emulator, mnt, cache) as proc:
        files = sorted(series.glob("*.dcm"))
        stop = threading.Event()

        def keep_reading() -> None:
            while not stop.is_set():
                try:
                    for f in files:
                        f.read_bytes()
                except OSError:
                    return  # the mount went away under us, as it should

        threads = [threading.Thread(target=keep_reading) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert "Traceback" not in log and "Fatal" not in log, log[-2000:]


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK),
                    reason="dropping the kernel's caches needs root")
def test_pages_are_pushed_again_after_the_kernel_dropped_them(emulator, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    series, truth = _warm_cache(emulator, mnt, cache)
    with mounted(emulator, mnt, cache):
        files = sorted(series.glob("*.dcm"))
        for f in files:
            f.read_bytes()
        before = status_json(mnt)["page_cache"]
        # Pages, dentries and inodes go; the kernel tells the daemon with FORGET.
        Path(DROP_CACHES).write_text("3\n")
        files = sorted(series.glob("*.dcm"))
        for f in files:
            assert f.read_bytes() == truth[f.name.removesuffix(".dcm")]
        after = status_json(mnt)["page_cache"]
        pushed = sum(after[k] - before[k] for k in ("pushed_at_open", "pushed_ahead"))
        assert pushed == len(files), (before, after)
        assert after["reads_through_daemon"] == 0, after
        # The cache files went too: a worker read them from disk, not the event loop.
        assert after["read_from_disk"] > before["read_from_disk"], (before, after)


def test_in_memory_tells_cached_pages_from_evicted_ones(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back, so that dropping the page cache can evict it
        os.pread(fd, 3 << 20, 0)
        assert pagepush.in_memory(fd, 3 << 20)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not pagepush.in_memory(fd, 3 << 20)
        os.pread(fd, 1 << 20, 0)  # a third of it back: not enough to push without waiting
        assert not pagepush.in_memory(fd, 3 << 20)
        pagepush.read_through(fd, 3 << 20)
        assert pagepush.in_memory(fd, 3 << 20)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pagepush.read_soon(str(path), 3 << 20)  # returns at once; the disk reads on
        deadline = time.monotonic() + 10
        while not pagepush.in_memory(fd, 3 << 20):
            assert time.monotonic() < deadline, "read_soon read nothing"
            time.sleep(0.01)
    finally:
        os.close(fd)
