"""Figure 13: a cold study copy with `--source auto` (NBIA's tree, IDC's buckets where IDC
holds a series) against `--source nbia`, on the same emulated link.

The bench profile has no IDC side, so this figure runs its own emulator: the demo
profile with its S3 endpoint, shaped as the others (latency on every request, the
bandwidth cap on every body). Its largest study on the main server is copied, each
repetition from a fresh mount and an empty cache, and checked byte for byte against
NBIA's MD5 lists. A third copy, not in the ratio, is auto again with an empty cache but
the object map an earlier mount kept (a remount, or a cache cleared): its cost without
the one-time header pass.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

from tciafs.emulator import launch

from .archive import References, Series, study_path
from .procs import BenchError, Emulator, mounted, run_timed
from .steps import Context, alternate, median
from .verify import check_copy

MAP_FILE = "idc-object-map.sqlite"  # tciafs.sources.auto.source.MAP_FILE

KEY = "13_auto_vs_nbia_study_copy"
CATALOG = "/_emulator/idc/idc_index.parquet"


def fig13(ctx: Context) -> None:
    shaped = ("--latency-ms", str(ctx.shaping.latency_ms),
              "--bandwidth", str(ctx.shaping.bandwidth))
    log = ctx.results / "logs" / "emulator-auto.log"
    try:
        running = launch.start("--profile", "demo", *shaped, data_dir=ctx.work.fresh("demo"),
                               nlst=True, s3=True, log=log)
    except launch.EmulatorStartError as exc:
        raise BenchError(str(exc)) from exc
    with running:
        emu = Emulator(running, ctx.shaping)
        study = largest_study(emu)
        refs = References(emu, ctx.work.root)
        expected = {sop: md5 for s in study for sop, md5 in refs.expected(s).items()}
        kept = ctx.work.fresh("kept-map") / MAP_FILE
        times: dict[str, list[float]] = {"auto": [], "nbia": [], "auto_mapped": []}
        for i in range(ctx.reps()):
            alternate(i, *(lambda i=i, run=run: times[run].append(cold_study_copy(
                ctx, running, run, study, expected, f"fig13-{run}-{i}", kept))
                for run in ("auto", "nbia")))
            times["auto_mapped"].append(cold_study_copy(
                ctx, running, "auto_mapped", study, expected, f"fig13-auto-mapped-{i}", kept))
    fig = ctx.fig(KEY)
    fig.samples = {"auto_cp_s": times["auto"], "nbia_cp_s": times["nbia"],
                   "auto_map_kept_cp_s": times["auto_mapped"]}
    fig.set(median(times["auto"]), median(times["nbia"]))
    size = sum(s.size for s in study) / 1e6
    fig.note = (f"the demo archive's largest study: {len(study)} series, {len(expected)} "
                f"files, {size:.1f} MB, verified against NBIA's MD5 lists; auto reads the "
                "series IDC holds as parallel object GETs (one per file; the first time, the pass "
                "that maps objects to instances reads them); with the object map kept, auto "
                f"took {median(times['auto_mapped']):.2f} s")


def largest_study(emu: Emulator) -> list[Series]:
    """The series of the study with the most files on the main server."""
    by_study: dict[str, list[Series]] = defaultdict(list)
    for row in emu.api("getCollectionValues"):
        for r in emu.api("getSeries", Collection=row["Collection"]):
            by_study[r["StudyInstanceUID"]].append(Series(
                r["SeriesInstanceUID"], r["StudyInstanceUID"], r["PatientID"],
                r["Collection"], int(r["ImageCount"]), int(r["FileSize"])))
    if not by_study:
        raise BenchError("the demo archive lists no study")
    return max(by_study.values(), key=lambda v: sum(s.images for s in v))


def cold_study_copy(ctx: Context, emu: launch.RunningEmulator, run: str,
                    study: list[Series], expected: dict[str, str], label: str,
                    kept: Path) -> float:
    """`cp -r` of the study from a fresh mount with an empty cache, then every byte
    checked; the seconds `cp` took. `run`: "nbia", "auto" (its object map is kept at
    `kept` afterwards) or "auto_mapped" (auto, starting from the map kept)."""
    assert emu.s3_url is not None and emu.nlst_url is not None
    cache, mnt, dest = (ctx.work.fresh(n) for n in ("cache", "mnt", "copy"))
    source = "nbia" if run == "nbia" else "auto"
    extra = ["--cache-size", ctx.cache_size, "--nlst-server", emu.nlst_url,
             "--source", source]
    if run == "auto_mapped":
        shutil.copyfile(kept, cache / MAP_FILE)
    if source == "auto":
        extra += ["--s3-endpoint", emu.s3_url, "--idc-catalog", emu.s3_url + CATALOG]
    try:
        with mounted(emu.url, mnt, cache, ctx.results / "logs" / f"{label}.log",
                     *extra) as mount:
            src = study_path(mount.mountpoint, study[0])
            os.stat(src)  # the path down to it is resolved before the clock starts
            seconds = run_timed(["cp", "-r", src, dest / "study"])
        check_copy(dest, expected, label)
        if run == "auto":
            shutil.copyfile(cache / MAP_FILE, kept)
        return seconds
    finally:
        ctx.work.discard(cache, mnt, dest)
