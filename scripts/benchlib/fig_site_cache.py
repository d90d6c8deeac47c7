"""Figure 11: four nodes copy one study at once through the site cache (docs/cluster.md).

The site cache is a real nginx running contrib/nginx/tciafs-site-cache.conf (benchlib's
nginx launcher, the one tests/test_site_cache.py runs) in front of the shaped emulator;
each node is a tciafs mount with a cache directory of its own. Every repetition starts a
fresh nginx on an empty cache directory and fresh node caches, and runs both sides:
the nodes copying the study at once, and one node alone copying it the same way.

11a counts what crossed the "uplink": the emulator's own byte counter (response bodies of
every request the nodes caused, listings included), against the study's bytes as the
service sends them (its series' getImage ZIPs, one each). 11b times the concurrent copies,
from the start of the first `cp -r` to the end of the last, against the lone node's copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .archive import study_path
from .nginx import SiteCache
from .procs import cpu_seconds, run_timed
from .steps import MB, Context, alternate, median, session
from .verify import check_copy

IMAGE_ENDPOINTS = ("getImage", "getImageWithMD5Hash", "getSingleImage")


@dataclass
class SiteCopy:
    """One run of `nodes` nodes copying the study at once through a cold site cache."""

    nodes: int
    wall_s: float  # first `cp -r` started to last one done
    node_s: list[float]  # each node's own `cp -r`
    upstream_bytes: int  # response bodies the emulator sent, every request included
    upstream_images: int  # image requests that reached the emulator
    cache_answers: Counter[str]  # nginx's cache status of each image answer
    daemon_cpu_s: float  # CPU time of all the nodes' daemons during the copies
    emulator_cpu_s: float
    machine_busy: float  # share of all the machine's CPUs busy during the copies, 0 to 1


def fig11(ctx: Context) -> None:
    study = ctx.bench.study4
    expected = {k: v for s in study for k, v in ctx.refs.expected(s).items()}
    study_bytes = sum(ctx.refs.zip_bytes(s) for s in study)
    alone: list[SiteCopy] = []
    together: list[SiteCopy] = []
    for i in range(ctx.reps()):
        alternate(i, lambda i=i: alone.append(site_copy(ctx, f"fig11-alone-rep{i}", 1,
                                                        expected)),
                  lambda i=i: together.append(site_copy(ctx, f"fig11-nodes-rep{i}",
                                                        ctx.nodes, expected)))
    bytes_fig = ctx.fig("11a_site_cache_upstream_bytes")
    bytes_fig.samples = {"upstream_MB": [c.upstream_bytes / MB for c in together],
                         "alone_upstream_MB": [c.upstream_bytes / MB for c in alone],
                         "upstream_image_requests": [c.upstream_images for c in together]}
    bytes_fig.set(median(bytes_fig.samples["upstream_MB"]), study_bytes / MB)
    bytes_fig.note = _bytes_note(ctx, together, alone)
    time_fig = ctx.fig("11b_site_cache_concurrent_copy")
    time_fig.samples = {"wall_s": [c.wall_s for c in together],
                        "alone_s": [c.wall_s for c in alone],
                        "slowest_node_s": [max(c.node_s) for c in together],
                        "fastest_node_s": [min(c.node_s) for c in together],
                        "daemons_cpu_s": [round(c.daemon_cpu_s, 2) for c in together],
                        "alone_daemon_cpu_s": [round(c.daemon_cpu_s, 2) for c in alone],
                        "emulator_cpu_s": [round(c.emulator_cpu_s, 2) for c in together],
                        "machine_busy": [round(c.machine_busy, 2) for c in together],
                        "alone_machine_busy": [round(c.machine_busy, 2) for c in alone]}
    time_fig.set(median(time_fig.samples["wall_s"]), median(time_fig.samples["alone_s"]))
    time_fig.note = _time_note(ctx, together, alone)


def _bytes_note(ctx: Context, together: list[SiteCopy], alone: list[SiteCopy]) -> str:
    answers = sum((c.cache_answers for c in together), Counter())
    study = ctx.bench.study4
    return (f"{ctx.nodes} nodes, {len(study)} series, "
            f"{sum(s.size for s in study) / MB:.0f} MB of instances; image requests that "
            f"reached the service per run: {[c.upstream_images for c in together]}; nginx's "
            f"image answers over all runs: {dict(sorted(answers.items()))}; one node alone "
            f"through a cold site cache: {median([c.upstream_bytes for c in alone]) / MB:.1f} "
            "MB upstream; every copy verified against the MD5 lists")


def _time_note(ctx: Context, together: list[SiteCopy], alone: list[SiteCopy]) -> str:
    slowest = median([max(c.node_s) for c in together])
    fastest = median([min(c.node_s) for c in together])
    cpus = os.cpu_count() or 1
    daemons = median([c.daemon_cpu_s for c in together])
    # What the daemons' work alone costs once spread over every CPU: the machine cannot
    # copy faster than that, however well the site cache shares the downloads.
    floor = daemons / cpus / median([c.wall_s for c in alone])
    return (f"each node's own `cp -r` {fastest:.2f}-{slowest:.2f} s (medians of the fastest "
            f"and slowest); CPU of the {ctx.nodes} daemons together {daemons:.1f} s against "
            f"{median([c.daemon_cpu_s for c in alone]):.1f} s for one, which over "
            f"{cpus} CPUs is alone {floor:.2f}x the lone copy; all CPUs "
            f"{median([c.machine_busy for c in together]):.0%} busy during the copies "
            f"({median([c.machine_busy for c in alone]):.0%} for one node); emulator "
            f"{median([c.emulator_cpu_s for c in together]):.1f} s; a fresh nginx cache and "
            "fresh node caches for every run")


def site_copy(ctx: Context, label: str, nodes: int, expected: dict[str, str]) -> SiteCopy:
    """Mount `nodes` nodes on a fresh site cache, copy the study on all at once, verify."""
    study = ctx.bench.study4
    dests = [ctx.work.fresh("copy") for _ in range(nodes)]
    try:
        with site_cache(ctx, label) as site:
            ctx.emu.reset()  # from here on, every byte the nodes cause upstream counts
            with contextlib.ExitStack() as stack:
                mounts = [stack.enter_context(session(ctx, f"{label}-node{n}", server=site.url,
                                                   extra=("--site-cache", site.url)))
                          for n in range(nodes)]
                sources = [study_path(m.mountpoint, study[0]) for m in mounts]
                for src in sources:
                    os.stat(src)  # the path down to it is resolved before the clock starts
                cpu = ([cpu_seconds(m.pid) for m in mounts], cpu_seconds(ctx.emu.proc.pid))
                busy = machine_cpu()
                wall_s, node_s = copy_at_once(sources, dests)
                busy_share = busy_since(busy)
                daemon_cpu = sum(cpu_seconds(m.pid) - c for m, c in zip(mounts, cpu[0],
                                                                         strict=True))
                emulator_cpu = cpu_seconds(ctx.emu.proc.pid) - cpu[1]
            answers = Counter(line.cache for line in site.log()
                              if line.endpoint in IMAGE_ENDPOINTS)
        # Read once nginx is gone: a download it finished for a node that left counts too.
        asked = ctx.emu.stats()
        for n, dest in enumerate(dests):
            check_copy(dest, expected, f"{label}-node{n}")
        return SiteCopy(nodes, wall_s, node_s, asked["bytes_sent"],
                        sum(asked["requests"].get(e, 0) for e in IMAGE_ENDPOINTS), answers,
                        daemon_cpu, emulator_cpu, busy_share)
    finally:
        ctx.work.discard(*dests)


def copy_at_once(sources: list[Path], dests: list[Path]) -> tuple[float, list[float]]:
    """`cp -r` of each source to its destination, all started together; the wall time
    from the first start to the last end, and each copy's own time."""
    with ThreadPoolExecutor(len(sources)) as pool:
        start = time.perf_counter()
        node_s = list(pool.map(lambda pair: run_timed(["cp", "-r", *pair]),
                               zip(sources, dests, strict=True)))
        wall_s = time.perf_counter() - start
    return wall_s, node_s


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all the machine's CPUs so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        # user nice system idle iowait irq softirq steal; guest time is inside user.
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait; steal counts as busy: it was not ours
    return sum(ticks) - idle, sum(ticks)


def busy_since(start: tuple[int, int]) -> float:
    """The share of the machine's CPU time that was busy since `start` (machine_cpu)."""
    busy, total = machine_cpu()
    return (busy - start[0]) / max(1, total - start[1])


@contextlib.contextmanager
def site_cache(ctx: Context, label: str) -> Iterator[SiteCache]:
    """A fresh nginx with the repository's config and an empty cache directory in front of
    the emulator, stopped when the block ends; its logs are kept with the results."""
    root = ctx.work.fresh("nginx")
    # The bench emulator serves no NLST host; the config still needs an upstream for it.
    site = SiteCache(root, ctx.emu.url, ctx.emu.url)
    site.start()
    try:
        yield site
    finally:
        site.stop()
        for name in ("access.log", "error.log"):
            if (root / name).exists():
                shutil.copy(root / name, ctx.results / "logs" / f"{label}-nginx-{name}")
        ctx.work.discard(root)
