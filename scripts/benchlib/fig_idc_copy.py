"""Figure 14: cold `cp -r` of the 200-slice CT series from an IDC mount (`--source idc`)
against parallel `curl` of the same objects with the same connection cap.

The bench profile's series are in the emulator's S3 buckets as well (one object per
instance, under the series' UUID); this figure starts an emulator of its own with its S3
side, shaped as the NBIA one. The baseline lists the series' prefix (not timed), then
fetches every object with one `curl --parallel --parallel-max N`, N being the mount's cap
per series (`--series-connections`). Both copies are checked against the objects' ETags,
which are their MD5s.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tciafs.defaults import SERIES_CONNECTIONS
from tciafs.emulator import launch
from tciafs.sources.idc import catalog as idc_catalog
from tciafs.sources.idc import s3xml

from .procs import BenchError, InFlightSampler, cpu_seconds, mounted, run_timed
from .steps import MB, Context, alternate, median
from .verify import md5_file

CATALOG = "/_emulator/idc/idc_index.parquet"


@contextmanager
def idc_emulator(ctx: Context) -> Iterator[launch.RunningEmulator]:
    shaped = ("--latency-ms", str(ctx.shaping.latency_ms),
              "--bandwidth", str(ctx.shaping.bandwidth))
    try:
        running = launch.start("--profile", "bench", *shaped, s3=True,
                               command=[sys.executable, "-m", "tciafs.emulator"],
                               log=ctx.results / "logs" / "emulator-idc.log")
    except launch.EmulatorStartError as exc:
        raise BenchError(str(exc)) from exc
    with running:
        yield running


def objects_of(s3_url: str, series_uid: str) -> tuple[str, dict[str, str]]:
    """The series' prefix URL and {object name without .dcm: ETag MD5}, from one
    ListObjectsV2 of its prefix (a series of the bench holds fewer than 1,000)."""
    place = idc_catalog.load(s3_url + CATALOG).place(series_uid)
    if place is None:
        raise BenchError(f"series {series_uid} is not in the IDC catalog")
    reply = httpx.get(f"{s3_url}/{place.bucket}", timeout=60,
                      params={"list-type": "2", "prefix": f"{place.uuid}/"})
    reply.raise_for_status()
    page = s3xml.parse_list(reply.content, "the series' listing")
    found = {o.key.rsplit("/", 1)[-1].removesuffix(".dcm"): o.md5 or "" for o in page.objects}
    return f"{s3_url}/{place.bucket}/{place.uuid}", found


def parallel_curl(ctx: Context, prefix_url: str, objects: dict[str, str], cap: int) -> float:
    dest = ctx.work.fresh("idc-curl")
    try:
        args: list[str | Path] = ["curl", "-sS", "-f", "--parallel", "--parallel-max",
                                  str(cap)]
        for name in objects:
            args += ["-o", dest / f"{name}.dcm", f"{prefix_url}/{name}.dcm"]
        seconds = run_timed(args)
        _check(dest, objects, "parallel curl")
        return seconds
    finally:
        ctx.work.discard(dest)


def idc_copy(ctx: Context, s3_url: str, series_uid: str, objects: dict[str, str],
             label: str) -> tuple[float, float]:
    """A cold `cp -r` of the series from a fresh IDC mount: seconds and daemon CPU."""
    cache, mnt, dest = ctx.work.fresh("cache"), ctx.work.fresh("mnt"), ctx.work.fresh("copy")
    log = ctx.results / "logs" / f"{label}.log"
    try:
        with mounted(s3_url, mnt, cache, log, "--source", "idc", "--s3-endpoint", s3_url,
                     "--idc-catalog", s3_url + CATALOG, "--cache-size",
                     ctx.cache_size) as mount:
            src = next(mnt.glob(f"*/*/*/{series_uid}"), None)
            if src is None:
                raise BenchError(f"series {series_uid} not found in the IDC mount")
            cpu = cpu_seconds(mount.pid)
            with InFlightSampler(mount):
                seconds = run_timed(["cp", "-r", src, dest])
            cpu = cpu_seconds(mount.pid) - cpu
        _check(dest / series_uid, objects, label)
        return seconds, cpu
    finally:
        ctx.work.discard(cache, mnt, dest)


def _check(folder: Path, objects: dict[str, str], label: str) -> None:
    got = {p.stem: md5_file(p) for p in folder.glob("*.dcm")}
    if got != objects:
        wrong = sorted(k for k in objects.keys() | got.keys() if got.get(k) != objects.get(k))
        raise BenchError(f"{label}: {len(wrong)} files missing or wrong, e.g. {wrong[:3]}")


def fig14(ctx: Context) -> None:
    s = ctx.bench.ct200
    cap = SERIES_CONNECTIONS
    with idc_emulator(ctx) as emu:
        assert emu.s3_url is not None
        prefix_url, objects = objects_of(emu.s3_url, s.uid)
        if len(objects) != s.images:
            raise BenchError(f"the bucket lists {len(objects)} objects of {s.images}")
        copies: list[tuple[float, float]] = []
        curls: list[float] = []
        for i in range(ctx.reps()):
            alternate(i, lambda i=i: copies.append(
                          idc_copy(ctx, emu.s3_url or "", s.uid, objects, f"fig14-rep{i}")),
                      lambda: curls.append(parallel_curl(ctx, prefix_url, objects, cap)))
    fig = ctx.fig("14_idc_cold_series_copy")
    fig.samples = {"cp_s": [c[0] for c in copies], "daemon_cpu_s": [round(c[1], 2)
                                                                    for c in copies],
                   "parallel_curl_s": curls}
    fig.set(median([c[0] for c in copies]), median(curls))
    fig.note = (f"{s.images} objects, {s.size / MB:.0f} MB, checked against their ETags; "
                f"curl --parallel-max {cap}, the mount's default cap per series; daemon CPU "
                f"per copy {median([c[1] for c in copies]):.1f} s; issue 24 asks <= 1.1")
