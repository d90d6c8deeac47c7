"""The nine figures. Each compares tciafs with a baseline measured in the same run,
under the same shaping, and keeps the median of its repetitions.

Every timing is time.perf_counter around a real command run as a subprocess (`cp`,
`cat`, `head`, `find`, `curl`, `unzip`, a Python baseline). Cold runs get a fresh cache
directory and a fresh mount; the path down to the copied directory is resolved before
the clock starts (its parents' listings are not part of a copy), the copied directory's
own listing is. Copies are checked byte for byte against the service's MD5s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .archive import BenchSet, References, Series, image_url, single_image_url, study_path
from .procs import (
    BenchError,
    Emulator,
    InFlightSampler,
    Mount,
    Shaping,
    cpu_seconds,
    emulator,
    mounted,
    null_mounted,
    run_timed,
)
from .report import Figure, Target
from .verify import check_copy, md5_file

HERE = Path(__file__).resolve().parent
MB = 1e6
FULL_SCALE = ("--profile", "scale")  # 1,000 series, 100,000 instances
DROP_CACHES = "/proc/sys/vm/drop_caches"
QUICK_SCALE = (4, 5)  # collections, patients: 200 series, 20,000 instances
T = TypeVar("T")


class Workspace:
    """Scratch directories under one temporary root, removed as soon as done with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._serial = itertools.count(1)

    def fresh(self, name: str) -> Path:
        path = self.root / f"{name}-{next(self._serial)}"
        path.mkdir(parents=True)
        return path

    @staticmethod
    def discard(*paths: Path) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Context:
    emu: Emulator
    bench: BenchSet
    refs: References
    work: Workspace
    results: Path
    repeat: int
    quick: bool
    shaping: Shaping
    figures: dict[str, Figure] = field(default_factory=dict)
    cache_size: str = "4G"

    def fig(self, key: str) -> Figure:
        return self.figures[key]

    def reps(self, heavy: bool = False) -> int:
        """Repetitions; the long figures (7, 8) do one fewer."""
        return max(1, self.repeat - 1) if heavy else self.repeat


def declare() -> list[Figure]:
    return [
        Figure("1_cold_series_copy", "cold `cp -r` of the 200-slice CT series (empty cache) "
               "vs `curl` getImage + `unzip`", "s", Target("<=", 1.25)),
        Figure("2_cold_study_copy", "cold `cp -r` of the 4-series study vs the four "
               "`curl` + `unzip` done one after another", "s", Target("<=", 0.6)),
        Figure("3_study_vs_tcia_utils", "cold `cp -r` of the 4-series study vs tcia_utils-"
               "style downloads (httpx, NewFileNames=Yes, whole ZIP in memory, zipfile)",
               "s", Target("<=", 1.0)),
        Figure("4_first_byte", "open + read 1 byte (`head -c 1`) of the middle instance of "
               "an uncached series vs `curl` getSingleImage of it", "s", Target("<=", 1.5)),
        Figure("5_warm_read", "`cat` of the cached series after a remount (no page cache) "
               "vs `cat` of the cache's object files; throughput", "MB/s", Target(">=", 0.40)),
        *([Figure("5b_warm_read_from_disk", "the same two `cat`s with the machine's page "
                  "cache dropped before each, so both read the cache files from disk; "
                  "throughput", "MB/s", Target(">=", 0.40))] if can_drop_caches() else []),
        Figure("6_page_cache_reread", "second `cat` in the same mount (kernel page cache) vs "
               "native re-read of the cache files; throughput", "MB/s", Target(">=", 0.8)),
        Figure("7a_find_cold", "`find` over the scale profile, fresh cache: value = requests, "
               "baseline = directories listed", "", Target("<=", 1.0, unit="request/dir")),
        Figure("7b_find_remount", "`find` after a remount on the same cache: value = "
               "requests, baseline = the cold run's", "", Target("==", 0, "value", "requests")),
        Figure("8_peak_rss", "daemon VmHWM at the end of `cp -r`: value = the ~1 GB CT, "
               "baseline = the ~100 MB MR", "MB", Target("<=", 30, "difference", "MB")),
        Figure("9_resumed_series_copy", "`cp -r` of the 200-slice CT series after a tenth "
               "of its cached files were lost vs `curl` getImage + `unzip` (fetching it "
               "again whole)", "s", Target("<=", 0.5)),
        Figure("10_cut_series_prefetch", "`tciafs cache prefetch` of the 200-slice CT series "
               "from a server that cuts every series ZIP short, then `cp -r` of it, vs `curl` "
               "getImage + `unzip` of the whole ZIP", "s", Target("<=", 3.0)),
    ]


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def _drop_caches() -> None:
    """Write back, then drop every clean page: the next reads come from the disk."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def number(key: str) -> int:
    return int(key.split("_")[0].rstrip("ab"))


# -- shared steps ---------------------------------------------------------------------------

@contextlib.contextmanager
def session(ctx: Context, label: str, cache: Path | None = None,
            server: str | None = None) -> Iterator[Mount]:
    """A mount on a fresh mountpoint; a fresh cache unless one is given (then kept)."""
    own_cache = cache is None
    cache = cache or ctx.work.fresh("cache")
    mnt = ctx.work.fresh("mnt")
    log = ctx.results / "logs" / f"{label}.log"
    try:
        with mounted(server or ctx.emu.url, mnt, cache, log,
                     "--cache-size", ctx.cache_size) as mount:
            try:
                yield mount
            finally:
                _save_status(ctx, label, mount)
    finally:
        ctx.work.discard(mnt, *([cache] if own_cache else []))


def _save_status(ctx: Context, label: str, mount: Mount) -> None:
    """Keep `tciafs status --json` of every mount in the results, for diagnosis."""
    try:
        doc = mount.status()
    except OSError:
        return
    doc["peak_rss_kib"] = mount.peak_rss_kib()
    path = ctx.results / "status" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


@dataclass
class Copy:
    seconds: float
    peak_rss_kib: int
    max_series_in_flight: int  # sampled from the daemon's status during the copy
    daemon_cpu_s: float  # CPU time the daemon used during the copy
    emulator_cpu_s: float  # ... and the emulator


def cold_copy(ctx: Context, label: str, source: Callable[[Path], Path],
              series: Sequence[Series]) -> Copy:
    """`cp -r` from a fresh mount with an empty cache, then check every byte."""
    dest = ctx.work.fresh("copy")
    try:
        with session(ctx, label) as mount:
            src = source(mount.mountpoint)
            os.stat(src)  # the path down to it is resolved before the clock starts
            cpu = (cpu_seconds(mount.pid), cpu_seconds(ctx.emu.proc.pid))
            with InFlightSampler(mount) as sampler:
                seconds = run_timed(["cp", "-r", src, dest])
            rss = mount.peak_rss_kib()
            daemon_cpu = cpu_seconds(mount.pid) - cpu[0]
            emulator_cpu = cpu_seconds(ctx.emu.proc.pid) - cpu[1]
        expected = {k: v for s in series for k, v in ctx.refs.expected(s).items()}
        check_copy(dest, expected, label)
        return Copy(seconds, rss, sampler.max_series, daemon_cpu, emulator_cpu)
    finally:
        ctx.work.discard(dest)


def copy_samples(copies: list[Copy]) -> dict[str, list[float]]:
    return {"cp_s": [c.seconds for c in copies],
            "max_series_in_flight": [c.max_series_in_flight for c in copies],
            "daemon_cpu_s": [round(c.daemon_cpu_s, 2) for c in copies],
            "emulator_cpu_s": [round(c.emulator_cpu_s, 2) for c in copies]}


def cpu_note(copies: list[Copy]) -> str:
    return (f"CPU per copy: daemon {median([c.daemon_cpu_s for c in copies]):.1f} s, emulator "
            f"{median([c.emulator_cpu_s for c in copies]):.1f} s ({os.cpu_count()} CPUs)")


def curl_unzip(ctx: Context, series: Series) -> float:
    """Raw getImage with curl to a file, then unzip: the time of both commands."""
    raw = ctx.work.fresh("raw")
    try:
        zip_path = raw / "series.zip"
        seconds = run_timed(["curl", "-sS", "-f", "-o", zip_path,
                             image_url(ctx.emu.url, series.uid)])
        seconds += run_timed(["unzip", "-q", zip_path, "-d", raw / "out"])
        count = len(list((raw / "out").glob("*.dcm")))
        if count != series.images:
            raise BenchError(f"curl + unzip gave {count} files, expected {series.images}")
        return seconds
    finally:
        ctx.work.discard(raw)


def alternate(i: int, *steps: Callable[[], None]) -> None:
    """Run the steps, in reverse order on odd repetitions (no side always goes first)."""
    for step in (steps[::-1] if i % 2 else steps):
        step()


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# -- 1: cold series copy --------------------------------------------------------------------

def against_download(ctx: Context, s: Series, copy: Callable[[int], T]
                     ) -> tuple[list[T], list[float]]:
    """Each repetition's copy through the mount, alternated with `curl` + `unzip` of the
    same series; both lists of results."""
    ctx.refs.expected(s)
    copies: list[T] = []
    raw_s: list[float] = []
    for i in range(ctx.reps()):
        alternate(i, lambda i=i: copies.append(copy(i)),
                  lambda: raw_s.append(curl_unzip(ctx, s)))
    return copies, raw_s


def fig1(ctx: Context) -> None:
    s = ctx.bench.ct200
    copies, raw_s = against_download(
        ctx, s, lambda i: cold_copy(ctx, f"fig1-rep{i}", s.path, [s]))
    fig = ctx.fig("1_cold_series_copy")
    fig.samples = {**copy_samples(copies), "curl_unzip_s": raw_s}
    fig.set(median(fig.samples["cp_s"]), median(raw_s))
    fig.note = (f"{s.images} files, {s.size / MB:.0f} MB, verified against the MD5 list; "
                f"{cpu_note(copies)}; issue 3 asked <= 2.0, issue 4 tightened it to <= 1.25")


# -- 2, 3: cold study copy ------------------------------------------------------------------

def fig23(ctx: Context) -> None:
    study = ctx.bench.study4
    for s in study:
        ctx.refs.expected(s)
    copies: list[Copy] = []
    seq_s: list[float] = []
    utils_s: list[float] = []
    for i in range(ctx.reps()):
        alternate(i, lambda i=i: copies.append(cold_copy(
                      ctx, f"fig2-rep{i}", lambda m: study_path(m, study[0]), study)),
                  lambda: seq_s.append(sum(curl_unzip(ctx, s) for s in study)),
                  lambda: utils_s.append(tcia_utils_like(ctx, study)))
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
    three.note = ("the same cold copies as figure 2; no target in the issues, <= 1.0 "
                  "(not slower than the official utilities) is this benchmark's")


def tcia_utils_like(ctx: Context, study: Sequence[Series]) -> float:
    dest = ctx.work.fresh("tcia-utils")
    try:
        seconds = run_timed([sys.executable, HERE / "tcia_utils_like.py", ctx.emu.url, dest,
                             *(s.uid for s in study)])
        count = len(list(dest.rglob("*.dcm")))
        if count != sum(s.images for s in study):
            raise BenchError(f"the tcia_utils-style baseline extracted {count} files")
        return seconds
    finally:
        ctx.work.discard(dest)


# -- 4: time to first byte ------------------------------------------------------------------

def fig4(ctx: Context) -> None:
    s = ctx.bench.ct200
    order = list(ctx.refs.expected(s))  # SOP UIDs in the ZIP's order
    middle, first = order[len(order) // 2], order[0]
    mids: list[FirstByte] = []
    firsts: list[FirstByte] = []
    curl_s: list[float] = []
    curl_ttfb: list[float] = []
    for i in range(ctx.reps()):
        alternate(i, lambda i=i: mids.append(first_byte(ctx, f"fig4-rep{i}", s, middle)),
                  lambda: curl_s.append(curl_single(ctx, s, middle, curl_ttfb)))
        firsts.append(first_byte(ctx, f"fig4-first-rep{i}", s, first))
    fig = ctx.fig("4_first_byte")
    first_s = median([f.seconds for f in firsts])
    direct = sum(f.single_fetches > 0 for f in mids)
    fig.samples = {"head_s": [f.seconds for f in mids], "curl_s": curl_s,
                   "curl_time_starttransfer_s": curl_ttfb,
                   "head_first_in_zip_s": [f.seconds for f in firsts]}
    fig.set(median(fig.samples["head_s"]), median(curl_s))
    fig.note = (f"instance {len(order) // 2 + 1} of {len(order)} in ZIP order; baseline = "
                "curl's wall time for the whole instance (open() returns only once it is all "
                f"there); the daemon fetched it with getSingleImage in {direct} of {len(mids)} "
                f"runs; the ZIP's first instance takes {first_s:.3f} s")
    fig.details = {"instance": middle, "first_in_zip_s": first_s,
                   "curl_time_starttransfer_s": median(curl_ttfb),
                   "runs_with_getSingleImage": direct}


@dataclass
class FirstByte:
    seconds: float
    single_fetches: int  # the daemon's count of instances fetched on their own


def first_byte(ctx: Context, label: str, s: Series, sop: str) -> FirstByte:
    scratch = ctx.work.fresh("head")
    try:
        with session(ctx, label) as mount:
            series_dir = s.path(mount.mountpoint)
            os.listdir(series_dir)  # the listing is not part of the first byte
            target = series_dir / f"{sop}.dcm"
            with open(scratch / "byte", "wb") as out:
                seconds = run_timed(["head", "-c", "1", target], stdout=out)
            singles = mount.status()["cache"]["single_fetches"]
            if (scratch / "byte").stat().st_size != 1:
                raise BenchError(f"{label}: head read no byte")
            if md5_file(target) != ctx.refs.expected(s)[sop]:
                raise BenchError(f"{label}: {sop}.dcm differs from the service's MD5")
        return FirstByte(seconds, singles)
    finally:
        ctx.work.discard(scratch)


def curl_single(ctx: Context, s: Series, sop: str, ttfb: list[float]) -> float:
    scratch = ctx.work.fresh("single")
    try:
        with open(scratch / "times", "wb") as out:
            seconds = run_timed(["curl", "-sS", "-f", "-o", scratch / "instance.dcm", "-w",
                                 "%{time_starttransfer}", single_image_url(ctx.emu.url, s.uid,
                                                                           sop)], stdout=out)
        ttfb.append(float((scratch / "times").read_text()))
        if md5_file(scratch / "instance.dcm") != ctx.refs.expected(s)[sop]:
            raise BenchError("getSingleImage returned other bytes than the series ZIP")
        return seconds
    finally:
        ctx.work.discard(scratch)


# -- 5, 6: warm reads -----------------------------------------------------------------------

def fig56(ctx: Context) -> None:
    s = ctx.bench.ct200
    expected = ctx.refs.expected(s)
    cache = ctx.work.fresh("cache")
    try:
        warm_up(ctx, s, cache)
        objects = sorted(p for p in cache.glob("objects/*/*") if p.is_file())
        nbytes = sum(p.stat().st_size for p in objects)
        if len(objects) != len(expected) or nbytes != s.size:
            raise BenchError(f"the cache holds {len(objects)} files, {nbytes} bytes; expected "
                             f"{len(expected)} files, {s.size} bytes")
        times: dict[str, list[float]] = {"native_s": [], "mount_warm_s": [],
                                         "mount_page_cache_s": [], "native_again_s": [],
                                         "mount_open_only_s": [], "native_open_only_s": [],
                                         "native_disk_s": [], "mount_disk_s": [],
                                         "null_open_only_s": [], "mount_read_open_s": [],
                                         "native_read_open_s": []}
        for i in range(ctx.reps()):
            with session(ctx, f"fig5-rep{i}", cache) as mount:
                files = sorted(s.path(mount.mountpoint).iterdir())
                times["native_s"].append(run_timed(["cat", *objects]))
                times["mount_warm_s"].append(run_timed(["cat", *files]))
                times["mount_page_cache_s"].append(run_timed(["cat", *files]))
                times["native_again_s"].append(run_timed(["cat", *objects]))
                # Diagnosis: what reading alone costs, the files opened beforehand.
                times["mount_read_open_s"].append(read_open(files))
                times["native_read_open_s"].append(read_open(objects))
                # Diagnosis: what opening and closing alone costs (head -c 0 reads nothing).
                times["mount_open_only_s"].append(run_timed(["head", "-q", "-c", "0", *files]))
                times["native_open_only_s"].append(run_timed(["head", "-q", "-c", "0",
                                                              *objects]))
                if i == 0:  # what was read is right (read again, untimed)
                    check_copy(s.path(mount.mountpoint), expected, "warm read")
            times["null_open_only_s"].append(null_opens(ctx, len(objects)))
        # Last, since dropping the page cache would slow the native reads of figure 5.
        for i in range(ctx.reps() if "5b_warm_read_from_disk" in ctx.figures else 0):
            with session(ctx, f"fig5b-rep{i}", cache) as mount:
                files = sorted(s.path(mount.mountpoint).iterdir())
                _drop_caches()
                times["native_disk_s"].append(run_timed(["cat", *objects]))
                _drop_caches()
                times["mount_disk_s"].append(run_timed(["cat", *files]))
    finally:
        ctx.work.discard(cache)
    _throughput(ctx.fig("5_warm_read"), nbytes, times, "mount_warm_s", "native_s")
    _throughput(ctx.fig("6_page_cache_reread"), nbytes, times, "mount_page_cache_s",
                "native_again_s")
    if "5b_warm_read_from_disk" in ctx.figures:
        _throughput(ctx.fig("5b_warm_read_from_disk"), nbytes, times, "mount_disk_s",
                    "native_disk_s")
        ctx.fig("5b_warm_read_from_disk").note = (
            "a cache larger than memory reads like this; not the issue's figure 5, which "
            "keeps the cache files in memory")
    opens = median(times["mount_open_only_s"])
    native_opens = median(times["native_open_only_s"])
    null = median(times["null_open_only_s"])
    share = (f"opening and closing the {len(objects)} files alone (`head -q -c 0`) takes "
             f"{opens * 1000:.0f} ms through the mount, {null * 1000:.0f} ms through a "
             f"pyfuse3 file system that does nothing (benchlib/nullfs.py), "
             f"{native_opens * 1000:.0f} ms natively")
    five, six = ctx.fig("5_warm_read"), ctx.fig("6_page_cache_reread")
    budget = median(times["native_s"]) / five.target.limit
    floor = median(times["mount_page_cache_s"])
    five.note = (f"{len(objects)} files, {nbytes / MB:.0f} MB; remounted between warm-up and "
                 f"reads so keep_cache cannot serve them; {share}, "
                 f"{opens / median(times['mount_warm_s']):.0%} of the warm cat, whose "
                 f"target allows {budget * 1000:.0f} ms; the same cat from the kernel's page "
                 f"cache (figure 6: the daemon only opens and closes) takes "
                 f"{floor * 1000:.0f} ms, a ratio of {median(times['native_s']) / floor:.2f} "
                 f"that this figure cannot pass; {_reading_note(times)}")
    six.note = (f"{share}, {opens / median(times['mount_page_cache_s']):.0%} of this re-read; "
                f"{_reading_note(times)}; no target in the issues, >= 0.8 is this "
                "benchmark's")
    for fig in (five, six):
        fig.samples |= {k: times[k] for k in ("mount_open_only_s", "native_open_only_s",
                                              "null_open_only_s", "mount_read_open_s",
                                              "native_read_open_s")}


def _reading_note(times: dict[str, list[float]]) -> str:
    mount, native = median(times["mount_read_open_s"]), median(times["native_read_open_s"])
    return (f"with the files opened beforehand, reading them from the page cache takes "
            f"{mount * 1000:.0f} ms through the mount and {native * 1000:.0f} ms natively "
            f"(benchlib/readopen.py)")


def read_open(paths: Sequence[Path]) -> float:
    """Seconds reading the files takes, opened beforehand (benchlib/readopen.py)."""
    done = subprocess.run([sys.executable, str(HERE / "readopen.py"), *map(str, paths)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"readopen.py exited {done.returncode}: {done.stderr[-500:]}")
    return float(done.stdout)


def null_opens(ctx: Context, count: int) -> float:
    """`head -q -c 0` over `count` files of the do-nothing file system, after one
    untimed pass, as the mount's files were looked up before theirs were timed."""
    mnt = ctx.work.fresh("nullfs")
    try:
        with null_mounted(mnt, count, ctx.results / "logs" / "nullfs.log"):
            files = sorted(mnt.iterdir())
            run_timed(["head", "-q", "-c", "0", *files])
            return run_timed(["head", "-q", "-c", "0", *files])
    finally:
        ctx.work.discard(mnt)


def warm_up(ctx: Context, s: Series, cache: Path) -> None:
    """Fill the cache with the series (not measured), then unmount."""
    with session(ctx, "fig5-warmup", cache) as mount:
        files = sorted(s.path(mount.mountpoint).iterdir())
        run_timed(["cat", *files])
        mount.wait_idle(s.images)


def _throughput(fig: Figure, nbytes: int, times: dict[str, list[float]], mine: str,
                theirs: str) -> None:
    fig.samples = {mine: times[mine], theirs: times[theirs]}
    value, baseline = nbytes / median(times[mine]) / MB, nbytes / median(times[theirs]) / MB
    fig.set(value, baseline)


# -- 7: find over the scale profile ---------------------------------------------------------

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


# -- 9: a series that lost a tenth of its cached files -----------------------------------

LOST_EVERY = 10  # every tenth file of the series is lost from the cache


def fig9(ctx: Context) -> None:
    s = ctx.bench.ct200
    resumed, raw_s = against_download(ctx, s, lambda i: resumed_copy(ctx, f"fig9-rep{i}", s))
    fig = ctx.fig("9_resumed_series_copy")
    fig.samples = {"cp_s": resumed, "curl_unzip_s": raw_s}
    fig.set(median(resumed), median(raw_s))
    fig.note = (f"{len(range(0, s.images, LOST_EVERY))} of {s.images} files deleted from a "
                "cache that held the whole series, verified (as eviction, a cleaner or "
                "`cache verify --repair` leaves it); the copy is checked against the MD5 list")


def resumed_copy(ctx: Context, label: str, s: Series) -> float:
    """Fill a cache with the series, lose every LOST_EVERY-th file, then time `cp -r`."""
    from tciafs.cache import object_path

    cache, dest = ctx.work.fresh("cache"), ctx.work.fresh("copy")
    try:
        with session(ctx, f"{label}-fill", cache) as mount:
            subprocess.run([sys.executable, "-m", "tciafs", "cache", "prefetch",
                            str(s.path(mount.mountpoint))], check=True, capture_output=True)
        for sop in sorted(ctx.refs.expected(s))[::LOST_EVERY]:
            object_path(cache, sop).unlink()
        with session(ctx, label, cache) as mount:
            src = s.path(mount.mountpoint)
            os.stat(src)
            seconds = run_timed(["cp", "-r", src, dest])
        check_copy(dest, ctx.refs.expected(s), label)
        return seconds
    finally:
        ctx.work.discard(cache, dest)


# -- 10: a server that cuts every series ZIP short ---------------------------------------

ZIP_ENDPOINTS = ["getImage", "getImageWithMD5Hash"]


def fig10(ctx: Context) -> None:
    s = ctx.bench.ct200
    runs, raw_s = against_download(ctx, s, lambda i: cut_prefetch(ctx, f"fig10-rep{i}", s))
    fig = ctx.fig("10_cut_series_prefetch")
    fig.samples = {"prefetch_and_cp_s": [r[0] for r in runs], "zips": [r[1] for r in runs],
                   "singles": [r[2] for r in runs], "curl_unzip_s": raw_s}
    fig.set(median(fig.samples["prefetch_and_cp_s"]), median(raw_s))
    fig.note = (f"every series ZIP cut at 10-90% of its bytes (the emulator's truncate fault), "
                f"as by servers that cut large files: {median(fig.samples['zips']):.0f} ZIPs "
                f"asked for, then {median(fig.samples['singles']):.0f} of {s.images} files "
                "alone (medians), the rest kept from the cut ZIPs; the copy is checked "
                "against the MD5 list; the baseline downloads the ZIP uncut, since a cut one "
                "never unzips; no target in the issues: <= 3 is this benchmark's, set after "
                "the first run from what the three cut ZIPs alone cost (1.5 whole ZIPs on "
                "average) plus the singles")


def cut_prefetch(ctx: Context, label: str, s: Series) -> tuple[float, int, int]:
    """Prefetch the series from a fresh mount while every series ZIP is cut short, then
    `cp -r` it; the time of both, and the ZIPs and single files asked for."""
    dest = ctx.work.fresh("copy")
    try:
        with session(ctx, label) as mount:
            src = s.path(mount.mountpoint)
            os.stat(src)
            ctx.emu.reset()
            ctx.emu.set_faults({**ctx.emu.shaping.as_faults(), "ptruncate": 1.0,
                                "endpoints": ZIP_ENDPOINTS})
            try:
                seconds = run_timed([sys.executable, "-m", "tciafs", "cache", "prefetch", src])
                seconds += run_timed(["cp", "-r", src, dest])
            finally:
                ctx.emu.set_faults(ctx.emu.shaping.as_faults())
            asked = ctx.emu.stats()["requests"]
        check_copy(dest, ctx.refs.expected(s), label)
        zips = sum(asked.get(name, 0) for name in ZIP_ENDPOINTS)
        return seconds, zips, asked.get("getSingleImage", 0)
    finally:
        ctx.work.discard(dest)
