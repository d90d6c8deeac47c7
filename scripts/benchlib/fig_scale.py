"""Figures 15 to 17 (`scripts/bench --scale`, never in --quick): walks at the scale of
NLST, counted in files per second and the daemon's peak resident memory.

- 15a: a walk of 10^6 files on a fresh cache, at the run's latency (50 ms a request);
- 15b: the same walk after a remount: no request, the catalog answers;
- 16a: the daemon's peak RSS over those two walks;
- 16b: the daemon's peak RSS over a walk of 10^7 files' worth of listings (no file is
  read: metadata only), at 0 ms so that it ends in reasonable time;
- 17: a warm `ls -l` of the largest collection (NLST: 26,410 patients) after a remount,
  against a native `ls -l` of a local directory with as many entries.

The walk is scripts/benchlib/walker.py: depth first, readdir and the entries' types,
no stat, as `find` does; it stops once it has seen the wanted number of files.

The profile is a parameter (`--scale-profile`, default `nlst`). `sized:C,P,S,R,I` names
the on-demand `scale` profile with C collections of P patients, S studies a patient, R
series a study and I instances a series (sized_emulator.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .procs import BenchError, Emulator, emulator, run_timed
from .report import Figure, Target
from .steps import HERE, Context, session

WALK_FILES = 1_000_000
LISTING_FILES = 10_000_000
MB_KIB = 1000 / 1024  # KiB in a MB (VmHWM is in KiB)


def declare(profile: str) -> list[Figure]:
    return [
        Figure("15a_walk_cold", f"walk of {WALK_FILES:,} files ({profile}), fresh cache, at "
               "the run's latency: files/s (baseline: the target)", "files/s",
               Target(">=", 10_000, "value", "files/s")),
        Figure("15b_walk_remount", "the same walk after a remount: files/s (baseline: the "
               "target); requests in the note", "files/s",
               Target(">=", 20_000, "value", "files/s")),
        Figure("16a_walk_peak_rss", "daemon peak RSS (VmHWM) over the cold walk and the "
               "walk after the remount (baseline: the bound)", "MB",
               Target("<=", 200, "value", "MB")),
        Figure("16b_listings_peak_rss", f"daemon peak RSS over a walk of {LISTING_FILES:,} "
               "files' worth of listings, metadata only, at 0 ms (baseline: the bound)",
               "MB", Target("<=", 300, "value", "MB")),
        Figure("17_ls_l_collection", "warm `ls -l` of the largest collection after a "
               "remount vs native `ls -l` of a local directory with as many entries", "s",
               Target("<=", 3.0)),
    ]


def emulator_command(profile: str) -> list[str]:
    if profile.startswith("sized:"):
        dims = profile.removeprefix("sized:").split(",")
        if len(dims) != 5:
            raise BenchError(f"sized profile needs five numbers: {profile!r}")
        return [sys.executable, str(HERE / "sized_emulator.py"), *dims]
    return [sys.executable, "-m", "tciafs.emulator", "--profile", profile]


def on_nlst_host(profile: str) -> bool:
    """The nlst profile's one collection is served by the NLST server, as the real
    service serves NLST: the walks need that server and a mount that names it."""
    return profile == "nlst"


def fig_scale(ctx: Context, profile: str, ls_profile: str) -> None:
    chosen = ctx.figures
    log = ctx.results / "logs"
    if {"15a_walk_cold", "15b_walk_remount", "16a_walk_peak_rss",
            "16b_listings_peak_rss"} & set(chosen):
        with emulator(emulator_command(profile), ctx.shaping,
                      log / "emulator-scale-walk.log", timeout=600,
                      nlst=on_nlst_host(profile)) as emu:
            walks(ctx, emu)
            if "16b_listings_peak_rss" in chosen:
                listings(ctx, emu)
    if "17_ls_l_collection" in chosen:
        with emulator(emulator_command(ls_profile), ctx.shaping,
                      log / "emulator-scale-ls.log", timeout=600,
                      nlst=on_nlst_host(ls_profile)) as emu:
            ls_long(ctx, emu)


def walk(root: Path, limit: int, long: bool = False) -> dict[str, float]:
    cmd = [sys.executable, str(HERE / "walker.py"), str(root), str(limit)]
    done = subprocess.run(cmd + (["--long"] if long else []), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"walker failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def walks(ctx: Context, emu: Emulator) -> None:
    cache = ctx.work.fresh("cache")
    try:
        with session(ctx, "scale-walk-cold", cache, server=emu.url,
                     extra=emu.mount_args) as mount:
            emu.reset()  # after the mount answers: its start-up probe is not counted
            cold = walk(mount.mountpoint, WALK_FILES)
            cold_req, cold_rss = emu.stats()["requests"], mount.peak_rss_kib()
            ahead = mount.status().get("listed_ahead", 0)
        with session(ctx, "scale-walk-remount", cache, server=emu.url,
                     extra=emu.mount_args) as mount:
            emu.reset()
            warm = walk(mount.mountpoint, WALK_FILES)
            warm_req, warm_rss = emu.stats()["requests"], mount.peak_rss_kib()
    finally:
        ctx.work.discard(cache)
    cold_rate, warm_rate = cold["files"] / cold["seconds"], warm["files"] / warm["seconds"]
    for key, rate, run, asked, target in (
            ("15a_walk_cold", cold_rate, cold, cold_req, 10_000),
            ("15b_walk_remount", warm_rate, warm, warm_req, 20_000)):
        if key in ctx.figures:
            fig = ctx.fig(key)
            fig.set(rate, target)
            fig.note = (f"{run['files']:.0f} files, {run['dirs']:.0f} directories in "
                        f"{run['seconds']:.1f} s; {sum(asked.values())} requests "
                        f"({_top(asked)})")
            fig.details = {"walk": run, "requests": asked, "listed_ahead": ahead}
    if "16a_walk_peak_rss" in ctx.figures:
        fig = ctx.fig("16a_walk_peak_rss")
        fig.set(max(cold_rss, warm_rss) / 1024 / MB_KIB, 200)
        fig.note = (f"cold walk {cold_rss / 1024 / MB_KIB:.0f} MB, after the remount "
                    f"{warm_rss / 1024 / MB_KIB:.0f} MB")


def listings(ctx: Context, emu: Emulator) -> None:
    with emu.unshaped(), session(ctx, "scale-listings", server=emu.url,
                     extra=emu.mount_args) as mount:
        run = walk(mount.mountpoint, LISTING_FILES)
        rss = mount.peak_rss_kib()
    fig = ctx.fig("16b_listings_peak_rss")
    fig.set(rss / 1024 / MB_KIB, 300)
    fig.note = (f"{run['files']:.0f} files, {run['dirs']:.0f} directories listed in "
                f"{run['seconds']:.0f} s at 0 ms")
    fig.details = {"walk": run}


def _top(asked: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(asked.items(), key=lambda kv: -kv[1])[:4])


def ls_long(ctx: Context, emu: Emulator) -> None:
    cache = ctx.work.fresh("cache")
    native = ctx.work.fresh("native")
    try:
        with session(ctx, "scale-ls-cold", cache, server=emu.url,
                     extra=emu.mount_args) as mount:
            collection, entries = _largest_collection(mount.mountpoint)
        with session(ctx, "scale-ls-remount", cache, server=emu.url,
                     extra=emu.mount_args) as mount:
            target = mount.mountpoint / collection
            first = run_timed(["ls", "-l", target])  # catalog warm, kernel cold
            again = [run_timed(["ls", "-l", target]) for _ in range(ctx.repeat)]
        for i in range(entries):
            (native / f"entry-{i:06d}").mkdir()
        run_timed(["ls", "-l", native])  # the native side warm too
        local = [run_timed(["ls", "-l", native]) for _ in range(max(3, ctx.repeat))]
    finally:
        ctx.work.discard(cache, native)
    fig = ctx.fig("17_ls_l_collection")
    fig.set(first, statistics.median(local))
    fig.samples = {"ls_l_after_remount_s": [first], "ls_l_again_s": again,
                   "native_s": local}
    fig.note = (f"{collection}: {entries} entries; again in the same mount "
                f"{statistics.median(again):.3f} s")


def _largest_collection(root: Path) -> tuple[str, int]:
    sizes = {p.name: sum(1 for _ in _entries(p)) for p in root.iterdir()
             if p.is_dir() and not p.name.startswith(".")}
    if not sizes:
        raise BenchError("the mount shows no collection")
    name = max(sizes, key=lambda n: sizes[n])
    run_timed(["ls", "-l", root / name])  # listed once: the catalog is warm after it
    return name, sizes[name]


def _entries(path: Path) -> Iterator[str]:
    with subprocess.Popen(["ls", "-1", str(path)], stdout=subprocess.PIPE, text=True) as ls:
        assert ls.stdout is not None
        yield from ls.stdout
