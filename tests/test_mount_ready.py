"""A mount with a warm catalog is ready at once, online or not: the service is probed in
the background while the stored tree is served. And a size shown after a read is the
size of the bytes read, now that the kernel may keep the size of a file not fetched.

Each test runs a real `tciafs mount` against an emulator it starts and stops itself.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cliutil import run_tciafs, status_json
from faultutil import _series_dirs, _sop, _truth

from conftest import start_emulator
from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def _ls(mnt: Path) -> str:
    return subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True,
                          timeout=60, check=True).stdout


@pytest.mark.timeout(180)
def test_a_warm_mount_serves_its_listings_while_the_service_is_probed(
        demo_data_dir: Path, tmp_path: Path) -> None:
    emu = start_emulator(demo_data_dir)
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    try:
        with mounted(emu, mnt, cache_dir, "--timeout", "2"):
            listing = _ls(mnt)
    finally:
        emu.stop()  # the service is gone before the next mount starts
    mnt.mkdir(exist_ok=True)
    started = run_tciafs("mount", str(mnt), "--server", emu.url, "--cache-dir",
                         str(cache_dir), "--timeout", "2", timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        # Ready before the probe's back-off (seconds of refused connections) has ended.
        assert "probing" in started.stderr and "in the background" in started.stderr
        assert status_json(mnt)["service"] == "probing"
        assert _ls(mnt) == listing  # served from the catalog, the service still down
        doc = status_json(mnt)
        assert doc["service"] in ("probing", "offline")
        assert "getCollectionValues" in doc["requests"]["requests"]  # the probe asked
    finally:
        run_tciafs("umount", str(mnt), timeout=60)


@pytest.mark.timeout(180)
def test_a_warm_mount_with_its_service_up_goes_online(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir):
        listing = _ls(mnt)
    with mounted(emulator, mnt, cache_dir):
        assert _ls(mnt) == listing
        for _ in range(100):
            if status_json(mnt)["service"] == "online":
                break
        assert status_json(mnt)["service"] == "online"
        assert "offline_at_start" not in status_json(mnt)


@pytest.mark.timeout(180)
def test_the_size_after_a_read_is_the_size_read(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir, "--no-prefetch"):
        series = _series_dirs(mnt)[0]
        truth = _truth(emulator.url, series.name)[0]
        files = sorted(series.glob("*.dcm"))[:3]
        for path in files:
            # Not fetched: size 0, which the kernel may now keep (attr timeout > 0) ...
            assert path.stat().st_size == 0
            assert path.stat().st_size == 0
            # ... and which no read may believe: the bytes come whole, and so does the size.
            with open(path, "rb") as f:
                data = f.read()
                assert os.fstat(f.fileno()).st_size == len(data)
            assert data == truth[_sop(path)]
            assert path.stat().st_size == len(data) > 0
