"""What the cache's tests share (tests/test_cache_*.py): the demo archive's series, its
instances and their bytes as the emulator serves them; the cache's index as stored; a
Cache run for the length of a test body; a disk that fills up; the `tciafs cache` command.

The `client` and `damage` fixtures they use are in conftest.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import zipfile
from pathlib import Path

import httpx
import pydicom
import trio
from cliutil import run_tciafs

from tciafs.cache import Cache, object_path


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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_tciafs("cache", *args, timeout=120)


def _present(cache_dir: Path, series: Path) -> int:
    """How many of the series' files the cache holds."""
    return sum(object_path(cache_dir, p.name.removesuffix(".dcm")).exists()
               for p in series.glob("*.dcm"))
