"""The steps the figures share: scratch space, the run's context, a mount of a fresh
or given cache, a timed cold copy checked byte for byte, the `curl` + `unzip` baseline,
and running both sides in turn.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .archive import BenchSet, References, Series, image_url
from .procs import (
    BenchError,
    Emulator,
    InFlightSampler,
    Mount,
    Shaping,
    cpu_seconds,
    mounted,
    run_timed,
)
from .report import Figure
from .verify import check_copy

HERE = Path(__file__).resolve().parent
MB = 1e6
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
    nodes: int = 4  # figure 11's nodes copying at once
    tcia_utils: Path | None = None  # a folder tcia_utils was installed into, for figure 3

    def fig(self, key: str) -> Figure:
        return self.figures[key]

    def reps(self, heavy: bool = False) -> int:
        """Repetitions; the long figures (7, 8) do one fewer."""
        return max(1, self.repeat - 1) if heavy else self.repeat


@contextlib.contextmanager
def session(ctx: Context, label: str, cache: Path | None = None,
            server: str | None = None, extra: Sequence[str] = ()) -> Iterator[Mount]:
    """A mount on a fresh mountpoint; a fresh cache unless one is given (then kept);
    `extra`: more `tciafs mount` options."""
    own_cache = cache is None
    cache = cache or ctx.work.fresh("cache")
    mnt = ctx.work.fresh("mnt")
    log = ctx.results / "logs" / f"{label}.log"
    try:
        with mounted(server or ctx.emu.url, mnt, cache, log,
                     "--cache-size", ctx.cache_size, *extra) as mount:
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

