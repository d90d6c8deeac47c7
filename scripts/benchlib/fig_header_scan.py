"""Figures 12a and 12b: a header scan of the 200-slice CT series from IDC's buckets.

pydicom `dcmread(stop_before_pixels=True)` of every file of the series, through a fresh
`--source idc` mount with an empty cache, against the emulator's S3 side (the bench
profile's series are all in its buckets). 12a: body bytes the bucket sent, against the
series' bytes; 12b: the scan's time, against a cold `cp -r` of the same series in the
same run, from another fresh mount.

The scan runs in a subprocess that times its own loop, after importing pydicom: the
interpreter's start is no part of a scan. The emulator is one of its own, with its S3
side, under the run's shaping.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tciafs.emulator import launch
from tciafs.names import encode
from tciafs.sources import build
from tciafs.sources.idc import IdcSource

from .procs import BenchError, Mount, mounted, run_timed
from .steps import MB, Context, alternate, median

CATALOG = "/_emulator/idc/idc_index.parquet"
SCAN = """
import os, sys, time
import pydicom
where = sys.argv[1]
start = time.perf_counter()
for name in sorted(os.listdir(where)):
    if name.endswith(".dcm"):
        pydicom.dcmread(os.path.join(where, name), stop_before_pixels=True)
print(time.perf_counter() - start)
"""


def fig12(ctx: Context) -> None:
    log = ctx.results / "logs" / "emulator-bench-s3.log"
    shaped = ("--latency-ms", str(ctx.shaping.latency_ms),
              "--bandwidth", str(ctx.shaping.bandwidth))
    try:
        running = launch.start("--profile", "bench", *shaped, log=log, s3=True,
                               command=[sys.executable, "-m", "tciafs.emulator"])
    except launch.EmulatorStartError as exc:
        raise BenchError(str(exc)) from exc
    with running:
        assert running.s3_url is not None
        s3 = running.s3_url
        where = _series_path(s3, ctx.bench.ct200.uid)
        scans: list[tuple[float, int, int, int]] = []
        copies: list[float] = []
        for i in range(ctx.reps()):
            alternate(i, lambda i=i: scans.append(_scan(ctx, s3, where, f"fig12-scan-rep{i}")),
                      lambda i=i: copies.append(_copy(ctx, s3, where, f"fig12-copy-rep{i}")))
    fetched = median([float(b) for _, b, _, _ in scans])
    series_bytes = scans[0][2]
    scan_s = median([s for s, _, _, _ in scans])
    bytes_fig = ctx.fig("12a_header_scan_bytes")
    bytes_fig.samples = {"fetched_MB": [b / MB for _, b, _, _ in scans]}
    # Each header asked for once: the files' count and the listing, no more.
    bytes_fig.details = {"s3_requests": [r for _, _, _, r in scans]}
    bytes_fig.set(fetched / MB, series_bytes / MB)
    bytes_fig.note = (f"{ctx.bench.ct200.images} files, {series_bytes / MB:.1f} MB; value = "
                      "body bytes the bucket sent for the scan (its listing included)")
    time_fig = ctx.fig("12b_header_scan_time")
    time_fig.samples = {"scan_s": [s for s, _, _, _ in scans], "cp_s": copies}
    time_fig.set(scan_s, median(copies))
    time_fig.note = "scan timed inside its process after importing pydicom; cp -r as a whole"


def _series_path(s3: str, series_uid: str) -> Path:
    """The series' path under a mount's root, from the emulator's IDC catalog."""
    source = build("idc", endpoint=s3, catalog=s3 + CATALOG, timeout=30)
    assert isinstance(source, IdcSource)
    found = source.catalog.series_by_uid(series_uid)
    if found is None:
        raise BenchError(f"series {series_uid} is not in the emulator's IDC catalog")
    return Path(encode(found.collection), encode(found.patient_id), found.study_uid,
                found.series_uid)


@contextmanager
def _idc_session(ctx: Context, s3: str, label: str) -> Iterator[Mount]:
    cache, mnt = ctx.work.fresh("cache"), ctx.work.fresh("mnt")
    try:
        with mounted(s3, mnt, cache, ctx.results / "logs" / f"{label}.log", "--source", "idc",
                     "--s3-endpoint", s3, "--idc-catalog", s3 + CATALOG,
                     "--cache-size", ctx.cache_size) as mount:
            yield mount
    finally:
        ctx.work.discard(mnt, cache)


def _sent(s3: str) -> tuple[int, int]:
    """Body bytes the bucket sent since the last reset, and the requests it answered."""
    stats = httpx.get(s3 + "/_emulator/stats", timeout=10).json()["servers"]["s3"]
    return int(stats["bytes_sent"]), int(stats["requests_total"])


def _reset(s3: str) -> None:
    httpx.post(s3 + "/_emulator/reset", timeout=10).raise_for_status()


def _scan(ctx: Context, s3: str, where: Path, label: str) -> tuple[float, int, int, int]:
    """The scan's seconds, the bytes the bucket sent for it, the series' bytes, and the
    requests the bucket answered for it."""
    with _idc_session(ctx, s3, label) as mount:
        series_dir = mount.mountpoint / where
        series_dir.parent.stat()  # the path down to it is resolved before the scan
        _reset(s3)
        out = ctx.results / "logs" / f"{label}.out"
        with open(out, "wb") as sink:
            run_timed([sys.executable, "-c", SCAN, series_dir], stdout=sink)
        fetched, requests = _sent(s3)
        seconds = float(out.read_text().split()[-1])
        total = sum(p.stat().st_size for p in series_dir.glob("*.dcm"))
    return seconds, fetched, total, requests


def _copy(ctx: Context, s3: str, where: Path, label: str) -> float:
    dest = ctx.work.fresh("copy")
    try:
        with _idc_session(ctx, s3, label) as mount:
            src = mount.mountpoint / where
            src.parent.stat()
            seconds = run_timed(["cp", "-r", src, dest])
            expected = sum(p.stat().st_size for p in src.glob("*.dcm"))
        copied = sum(p.stat().st_size for p in dest.rglob("*.dcm"))
        if copied != expected:
            raise BenchError(f"{label}: copied {copied} bytes of {expected}")
        return seconds
    finally:
        ctx.work.discard(dest)
