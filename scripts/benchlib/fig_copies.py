"""Figures 1, 2, 3 and 8: cold `cp -r` of a series or a study through a fresh mount,
against downloading the same with `curl` + `unzip` or tcia_utils-style, and the
daemon's peak memory while copying a small and a large series.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

from .archive import Series, study_path
from .procs import BenchError
from .steps import (
    HERE,
    MB,
    Context,
    Copy,
    against_download,
    alternate,
    cold_copy,
    copy_samples,
    cpu_note,
    curl_unzip,
    median,
)

# -- 1: cold series copy --------------------------------------------------------------------

def fig1(ctx: Context) -> None:
    s = ctx.bench.ct200
    copies, raw_s = against_download(
        ctx, s, lambda i: cold_copy(ctx, f"fig1-rep{i}", s.path, [s]))
    fig = ctx.fig("1_cold_series_copy")
    fig.samples = {**copy_samples(copies), "curl_unzip_s": raw_s}
    fig.set(median(fig.samples["cp_s"]), median(raw_s))
    fig.note = (f"{s.images} files, {s.size / MB:.0f} MB, verified against the MD5 list; "
                f"{cpu_note(copies)}; issue 3 asked <= 2.0, issue 4 <= 1.25, issue 26 <= 0.5")


# -- 2, 3: cold study copy ------------------------------------------------------------------

def fig23(ctx: Context) -> None:
    study = ctx.bench.study4
    for s in study:
        ctx.refs.expected(s)
    copies: list[Copy] = []
    seq_s: list[float] = []
    utils_s: list[float] = []
    clients: set[str] = set()
    for i in range(ctx.reps()):
        alternate(i, lambda i=i: copies.append(cold_copy(
                      ctx, f"fig2-rep{i}", lambda m: study_path(m, study[0]), study)),
                  lambda: seq_s.append(sum(curl_unzip(ctx, s) for s in study)),
                  lambda: utils_s.append(tcia_utils_like(ctx, study, clients)))
    total = sum(s.size for s in study) / MB
    copy_s = [c.seconds for c in copies]
    in_flight = [c.max_series_in_flight for c in copies]
    two, three = ctx.fig("2_cold_study_copy"), ctx.fig("3_study_vs_tcia_utils")
    two.samples = {**copy_samples(copies), "sequential_curl_unzip_s": seq_s}
    two.set(median(copy_s), median(seq_s))
    two.note = (f"{len(study)} series, {total:.0f} MB, verified against the MD5 lists; series "
                f"downloads in flight at once (most seen by `tciafs status` every 0.1 s): "
                f"{in_flight}; {cpu_note(copies)}")
    three.samples = {"cp_s": copy_s, "tcia_utils_like_s": utils_s}
    three.set(median(copy_s), median(utils_s))
    three.note = (f"the same cold copies as figure 2, against {', '.join(sorted(clients))} "
                  f"downloadSeries (its series in parallel, max_workers=10; only the "
                  f"download timed, not the import); issue 26 asks <= 0.8")


def tcia_utils_like(ctx: Context, study: Sequence[Series], clients: set[str]) -> float:
    """The official client's own download of the study (tcia_utils' downloadSeries, its
    series in parallel), or the same done like for like where it is not installed; the
    client used goes into `clients`."""
    dest = ctx.work.fresh("tcia-utils")
    try:
        env = dict(os.environ)
        if ctx.tcia_utils is not None:  # on this baseline's path only, not the mounts'
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ctx.tcia_utils), env.get("PYTHONPATH")) if p)
        out = subprocess.run([sys.executable, str(HERE / "tcia_utils_like.py"), ctx.emu.url,
                              str(dest), *(s.uid for s in study)],
                             capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            raise BenchError(f"the tcia_utils baseline exited {out.returncode}: "
                             f"{out.stderr.strip()[-500:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        count = len(list(dest.rglob("*.dcm")))
        if count != sum(s.images for s in study):
            raise BenchError(f"the tcia_utils baseline ({result['client']}) extracted "
                             f"{count} files")
        clients.add(result["client"])
        return float(result["seconds"])
    finally:
        ctx.work.discard(dest)


# -- 8: daemon peak RSS ---------------------------------------------------------------------

def fig8(ctx: Context) -> None:
    small = ctx.bench.mr100
    big = ctx.bench.ct1g
    for s in (small, big):
        ctx.refs.expected(s)
    runs: dict[str, list[Copy]] = {"small": [], "big": []}
    for i in range(ctx.reps(heavy=True)):
        alternate(i, lambda i=i: runs["small"].append(
                      cold_copy(ctx, f"fig8-small-rep{i}", small.path, [small])),
                  lambda i=i: runs["big"].append(
                      cold_copy(ctx, f"fig8-big-rep{i}", big.path, [big])))
    peak = {k: [c.peak_rss_kib * 1024 / MB for c in v] for k, v in runs.items()}
    secs = {k: median([c.seconds for c in v]) for k, v in runs.items()}
    fig = ctx.fig("8_peak_rss")
    fig.samples = {"small_MB": peak["small"], "big_MB": peak["big"],
                   "small_cp_s": [c.seconds for c in runs["small"]],
                   "big_cp_s": [c.seconds for c in runs["big"]]}
    fig.set(median(peak["big"]), median(peak["small"]))
    fig.note = (f"~1 GB: {big.images} files, {big.size / MB:.0f} MB copied in "
                f"{secs['big']:.1f} s; ~100 MB: {small.images} files, {small.size / MB:.0f} MB "
                f"in {secs['small']:.1f} s; both verified; VmHWM includes the daemon's start-up")
