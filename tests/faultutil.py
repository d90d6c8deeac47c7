"""What the fault tests of real mounts share (tests/test_faults_mount_*.py): the service's
bytes and MD5 list of a series, read without faults; the series directories of a mount;
the daemon's log, and the check that nothing escaped tciafs' own handling in it; a wait
for an emulator to fall quiet."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path

import httpx
import pydicom

from mountutil import stats

V4 = "/nbia-api/services/v4"


def _truth(url: str, series_uid: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The service's bytes of a series by SOP UID, and its MD5 list by SOP UID (no faults)."""
    r = httpx.get(f"{url}{V4}/getImage", params={"SeriesInstanceUID": series_uid,
                                                 "IncludeMD5": "Yes"}, timeout=60)
    r.raise_for_status()
    by_sop: dict[str, bytes] = {}
    md5s: dict[str, str] = {}
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        listed = dict(line.split(",") for line in
                      zf.read("md5hashes.csv").decode().strip().splitlines()[1:])
        for name in zf.namelist():
            if not name.endswith(".dcm"):
                continue
            data = zf.read(name)
            sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                  specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            by_sop[sop] = data
            md5s[sop] = listed[name]
            assert hashlib.md5(data).hexdigest() == listed[name]
    return by_sop, md5s


def _series_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*/*") if p.is_dir())


def _sop(path: Path) -> str:
    return path.name.removesuffix(".dcm")


def _log_of(mnt: Path, cache_dir: Path) -> str:
    return (cache_dir.parent / f"{mnt.name}-daemon.log").read_text(errors="replace")


def _assert_clean_log(log: str) -> None:
    # A traceback or "unexpected error" means an exception escaped tciafs' own handling.
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def _wait_quiet(url: str, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until the emulator has sent nothing for `quiet` seconds (background fetches)."""
    sent, since = -1, time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        now = stats(url)["bytes_sent"]
        if now != sent:
            sent, since = now, time.monotonic()
        time.sleep(0.1)
