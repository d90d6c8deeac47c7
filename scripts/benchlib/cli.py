"""`scripts/bench`: run the figures, print the table, write JSON and a chart."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import fig_scale
from . import figures as F
from .archive import References, discover
from .chart import write_chart
from .procs import Shaping, emulator
from .report import Figure, figures_json, table, write_json

REPO = Path(__file__).resolve().parents[2]
RUNNERS: list[tuple[frozenset[int], Callable[[F.Context], None]]] = [
    (frozenset({1}), F.fig1), (frozenset({2, 3}), F.fig23), (frozenset({4}), F.fig4),
    (frozenset({5, 6}), F.fig56), (frozenset({7}), F.fig7), (frozenset({8}), F.fig8),
    (frozenset({9}), F.fig9), (frozenset({10}), F.fig10), (frozenset({11}), F.fig11),
    (frozenset({12}), F.fig12), (frozenset({13}), F.fig13), (frozenset({14}), F.fig14)]
ALL = frozenset(range(1, 15))
SCALE = frozenset({15, 16, 17})  # --scale only: walks at NLST's scale take an hour


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and a smaller scale profile (under 3 minutes)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write {figure: {value, baseline, ratio, target, holds}} here")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results folder (default results/bench-<timestamp>/)")
    p.add_argument("--latency-ms", type=float, default=50.0,
                   help="latency the emulator adds to every request (default 50)")
    p.add_argument("--bandwidth", type=int, default=20_000_000, metavar="BYTES_PER_S",
                   help="per-connection cap on response bodies, 0 = none (default 20000000)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="repetitions per figure, median kept (default 3, 2 with --quick; "
                        "figures 7 and 8 do one fewer)")
    p.add_argument("--only", type=_numbers, default=None, metavar="LIST",
                   help="comma-separated figure numbers, e.g. 1,4 (default: all; 15-17 "
                        "need --scale)")
    p.add_argument("--nodes", type=int, default=4, metavar="N",
                   help="nodes copying at once in figure 11 (default 4)")
    p.add_argument("--tcia-utils", type=Path, default=None, metavar="DIR",
                   help="figure 3's baseline: the real tcia_utils from DIR, a folder it was "
                        "installed into with `pip install --target DIR tcia_utils` (put on "
                        "that baseline's path alone); default: the bench's own Python")
    p.add_argument("--scale", action="store_true",
                   help="also figures 15-17: walks of 10^6 and 10^7 files and `ls -l` of "
                        "a 26,410-patient collection (long; never part of --quick)")
    p.add_argument("--scale-profile", default="nlst", metavar="NAME",
                   help="emulator profile of the walks (default nlst; sized:C,P,S,R,I for "
                        "the on-demand scale profile of that shape)")
    p.add_argument("--scale-ls-profile", default=None, metavar="NAME",
                   help="profile of figure 17's collection (default: --scale-profile)")
    args = p.parse_args(argv)
    if args.scale and args.quick:
        p.error("--scale is kept out of --quick runs")
    if args.only is None:
        args.only = ALL | (SCALE if args.scale else frozenset())
    elif args.only & SCALE and not args.scale:
        p.error("figures 15-17 are measured with --scale")
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    return args


def _numbers(text: str) -> frozenset[int]:
    try:
        chosen = frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of figure numbers: {text!r}") from None
    if not chosen or not chosen <= ALL | SCALE:
        raise argparse.ArgumentTypeError(f"figure numbers are 1 to {max(ALL)} "
                                         f"(and {min(SCALE)} to {max(SCALE)} with --scale)")
    # Figures measured from the same runs come together: 2 with 3, 5 with 6.
    for pair in ({2, 3}, {5, 6}):
        if chosen & pair:
            chosen |= pair
    return chosen


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every mount is unmounted


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = args.out or REPO / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    (results / "logs").mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    declared = F.declare(args.nodes) + (fig_scale.declare(args.scale_profile)
                                        if args.scale else [])
    chosen = [f for f in declared if F.number(f.key) in args.only]
    shaping = Shaping(args.latency_ms, args.bandwidth)
    work = Path(tempfile.mkdtemp(prefix="tciafs-bench-"))
    say(f"tciafs bench: {'quick' if args.quick else 'full'} run, latency {args.latency_ms:g} "
        f"ms, {args.bandwidth} B/s per connection, {args.repeat} repetition(s); "
        f"results in {results}")
    try:
        run_all(args, shaping, results, work, chosen)
    except KeyboardInterrupt:
        say("tciafs bench: interrupted; mounts and emulators are stopped")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    write_outputs(args, results, chosen, shaping, wall)
    return 1 if any(f.error for f in chosen) else 0


def run_all(args: argparse.Namespace, shaping: Shaping, results: Path, work: Path,
            chosen: list[Figure]) -> None:
    bench_cmd = [sys.executable, "-m", "tciafs.emulator", "--profile", "bench"]
    try:
        with emulator(bench_cmd, shaping, results / "logs" / "emulator-bench.log") as emu:
            ctx = F.Context(emu, discover(emu), References(emu, work), F.Workspace(work),
                            results, args.repeat, args.quick, shaping,
                            {f.key: f for f in chosen}, nodes=args.nodes,
                            tcia_utils=args.tcia_utils)
            for numbers, runner in RUNNERS:
                if numbers & args.only:
                    run_figure(ctx, numbers, runner)
            if args.only & SCALE:
                run_figure(ctx, SCALE, lambda c: fig_scale.fig_scale(
                    c, args.scale_profile, args.scale_ls_profile or args.scale_profile))
    except Exception as exc:  # the emulator or the discovery failed: nothing measured
        _fail(results, chosen, ALL, exc)


def run_figure(ctx: F.Context, numbers: frozenset[int],
               runner: Callable[[F.Context], None]) -> None:
    names = ",".join(str(n) for n in sorted(numbers & {F.number(k) for k in ctx.figures}))
    say(f"figure {names} ...")
    began, load = time.perf_counter(), os.getloadavg()[0]
    try:
        runner(ctx)
    except Exception as exc:
        _fail(ctx.results, list(ctx.figures.values()), numbers, exc)
    took = time.perf_counter() - began
    for fig in ctx.figures.values():
        if F.number(fig.key) in numbers:  # other work on the host shows in the load
            fig.details |= {"figure_s": round(took, 1), "loadavg_1min": [load,
                                                                       os.getloadavg()[0]]}
    say(f"figure {names}: {took:.1f} s")


def _fail(results: Path, figures: list[Figure], numbers: frozenset[int],
          exc: Exception) -> None:
    say(f"  failed: {exc}")
    with open(results / "logs" / "harness.log", "a") as log:
        traceback.print_exception(exc, file=log)
    for fig in figures:
        if F.number(fig.key) in numbers and not fig.measured:
            fig.error = str(exc) or type(exc).__name__


def write_outputs(args: argparse.Namespace, results: Path, chosen: list[Figure],
                  shaping: Shaping, wall: float) -> None:
    doc = figures_json(chosen)
    write_json(results / "results.json", doc)
    if args.json:
        write_json(args.json, doc)
    mode = "quick" if args.quick else "full"
    meta = {"mode": mode, "wall_time_s": round(wall, 1), "repeat": args.repeat,
            "nodes": args.nodes, "tcia_utils": str(args.tcia_utils or ""),
            "latency_ms": shaping.latency_ms, "bandwidth": shaping.bandwidth,
            "only": sorted(args.only), "host": platform.node(), "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(), "python": sys.version,
            "command": " ".join(["scripts/bench", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": commit()}
    write_json(results / "meta.json", meta)
    write_chart(results, chosen, f"tciafs bench ({mode}) at {meta['commit']} on {meta['host']}",
                f"latency {shaping.latency_ms:g} ms, {_bandwidth(shaping.bandwidth)}, "
                f"{args.repeat} repetition(s); {meta['cpus']} CPUs; {meta['date']}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = table(chosen) + (f"\n\n{mode} run: wall time {wall:.1f} s; {args.repeat} "
                            f"repetition(s); {os.cpu_count()} CPUs, load average now {load}; "
                            f"results in {results} (results.json, meta.json, table.txt, "
                            "chart.png, chart.svg, logs/, status/)")
    (results / "table.txt").write_text(text + "\n")
    print(text)


def commit() -> str:
    """The short hash of the code measured, marked when the work tree has changes."""
    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *words], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"  # not a git checkout, or git is missing
    return f"{head} (modified)" if changed else head


def _bandwidth(bytes_per_s: int) -> str:
    return f"{bytes_per_s / 1e6:g} MB/s per connection" if bytes_per_s else "no bandwidth cap"
