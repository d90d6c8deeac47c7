"""Figure 7: `find` over the scale profile, on a fresh cache and after a remount,
counted in requests to the emulator.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, Emulator, emulator, run_timed
from .steps import HERE, Context, median, session

# -- 7: find over the scale profile ---------------------------------------------------------

FULL_SCALE = ("--profile", "scale")  # 1,000 series, 100,000 instances
QUICK_SCALE = (4, 5)  # collections, patients: 200 series, 20,000 instances


@dataclass
class FindRun:
    cold_s: float
    remount_s: float
    directories: int
    entries: int
    cold: dict  # the emulator's stats after the cold find
    remount: dict  # ... and after the find on the remount


def fig7(ctx: Context) -> None:
    if ctx.quick:
        cmd = [sys.executable, str(HERE / "scale_emulator.py"), *map(str, QUICK_SCALE)]
    else:
        cmd = [sys.executable, "-m", "tciafs.emulator", *FULL_SCALE]
    with emulator(cmd, ctx.shaping, ctx.results / "logs" / "emulator-scale.log") as emu:
        runs = [find_pair(ctx, emu, i) for i in range(ctx.reps(heavy=True))]
    cold_req = [float(r.cold["requests_total"]) for r in runs]
    warm_req = [float(r.remount["requests_total"]) for r in runs]
    cold_s, warm_s = median([r.cold_s for r in runs]), median([r.remount_s for r in runs])
    one = runs[0]
    cold, warm = ctx.fig("7a_find_cold"), ctx.fig("7b_find_remount")
    cold.set(median(cold_req), one.directories, median(cold_req) / one.directories)
    warm.set(median(warm_req), median(cold_req))
    cold.samples = {"requests": cold_req, "find_s": [r.cold_s for r in runs]}
    warm.samples = {"requests": warm_req, "find_s": [r.remount_s for r in runs]}
    cold.note = (f"{one.directories} directories, {one.entries} entries"
                 f"{' (reduced scale profile)' if ctx.quick else ''}; find took {cold_s:.1f} s;"
                 f" requests {one.cold['requests']}")
    warm.note = (f"find took {warm_s:.2f} s after the remount; requests "
                 f"{one.remount['requests']}; stats are reset once the mount answers, so "
                 "its start-up probe (getCollectionValues) is excluded")
    cold.details = {"find_s": cold_s, "directories": one.directories, "entries": one.entries,
                    "by_endpoint": one.cold["requests"], "reduced_scale": ctx.quick}
    warm.details = {"find_s": warm_s, "by_endpoint": one.remount["requests"]}


def find_pair(ctx: Context, emu: Emulator, i: int) -> FindRun:
    cache = ctx.work.fresh("cache")
    out = ctx.work.fresh("find") / "listing.txt"
    try:
        cold_s, cold = timed_find(ctx, emu, f"fig7-cold-rep{i}", cache, out)
        dirs, entries = count_listing(out)
        remount_s, warm = timed_find(ctx, emu, f"fig7-remount-rep{i}", cache, out)
        if count_listing(out) != (dirs, entries):
            raise BenchError("find after the remount listed other entries")
    finally:
        ctx.work.discard(cache, out.parent)
    return FindRun(cold_s, remount_s, dirs, entries, cold, warm)


def timed_find(ctx: Context, emu: Emulator, label: str, cache: Path, out: Path
               ) -> tuple[float, dict]:
    with session(ctx, label, cache, server=emu.url) as mount:
        emu.reset()  # after the mount answers: its start-up probe is not counted
        with open(out, "wb") as listing:
            seconds = run_timed(["find", mount.mountpoint], stdout=listing)
        stats = emu.stats()
    return seconds, stats


def count_listing(listing: Path) -> tuple[int, int]:
    """(directories, entries) of a `find MNT` listing, the root included.

    The directories are the parents of listed entries (find lists a directory's
    entries right after reading it); an empty directory would be missed, which can
    only make the requests-per-directory figure look worse.
    """
    parents: set[bytes] = set()
    entries = 0
    with open(listing, "rb") as lines:
        root = lines.readline().rstrip(b"\n")
        for line in lines:
            entries += 1
            parents.add(line.rstrip(b"\n").rpartition(b"/")[0])
    return len(parents | {root}), entries + 1
