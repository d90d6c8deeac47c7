"""`tciafs status`: what the caller's running mounts are doing, read through an xattr
on each mount's root (tciafs.controlproto)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tciafs.controlproto import read_status
from tciafs.mounts import own_mounts
from tciafs.paths import format_size


def render(mountpoint: Path, doc: dict[str, Any]) -> str:
    cache = doc["cache"]
    lines = [
        f"{mountpoint}: {doc['server']} (api {doc['api']}), up {_duration(doc['uptime'])}",
        f"  cache    {format_size(cache['used'])} of {format_size(cache['bound'])} "
        f"({cache['entries']} files), hit ratio {cache['hit_ratio']:.0%}, "
        f"{format_size(cache['bytes_fetched'])} fetched",
    ]
    lines += _archives(doc)
    if cache.get("series_fetches") or cache.get("series_resumed") or cache.get("single_fetches"):
        lines.append(f"  fetched  {cache.get('series_fetches', 0)} series whole, "
                     f"{cache.get('series_resumed', 0)} completed from their missing files, "
                     f"{cache.get('single_fetches', 0)} single files")
    if cache.get("series_cut_short"):
        lines.append(f"  {cache['series_cut_short']} series came file by file, as their ZIP "
                     "was cut short at every attempt (no MD5 list confirms them)")
    if doc.get("offline_at_start"):
        lines.append(f"  started {doc['offline_at_start']}")
    for origin, down in doc.get("unreachable", {}).items():
        since = time.strftime("%H:%M:%S", time.localtime(down["since"]))
        lines.append(f"  unreachable since {since}: {origin} ({down['reason']}); "
                     "each request tries it once until it answers")
    pages = doc.get("page_cache")
    if pages:
        lines.append(f"  kernel page cache: {pages['pushed_at_open']} files pushed at open, "
                     f"{pages['pushed_ahead']} ahead of the reader; "
                     f"{pages['reads_through_daemon']} reads reached the daemon"
                     + (f"; {pages['read_from_disk']} files read from disk first"
                        if pages.get("read_from_disk") else "")
                     + ("" if pages.get("read_ahead", "running") == "running"
                        else f" (read-ahead {pages['read_ahead']})"))
    requests = doc.get("requests", {})
    errors = requests.get("errors", {})
    lines.append(f"  requests {requests.get('requests_total', 0)} total, "
                 f"{sum(errors.values())} failed, {requests.get('retries', 0)} retries, "
                 f"{format_size(requests.get('bytes_received', 0))} received")
    for endpoint, count in sorted(requests.get("requests", {}).items()):
        failed = f"  ({errors[endpoint]} failed)" if errors.get(endpoint) else ""
        lines.append(f"    {endpoint:<28} {count}{failed}")
    if doc.get("listed_ahead"):
        lines.append(f"    of which directories listed ahead of a traversal: "
                     f"{doc['listed_ahead']}")
    flights = doc.get("in_flight", {})
    lines.append(f"  downloads in flight: {len(flights)}")
    for series, progress in flights.items():
        lines.append(f"    {series}  {format_size(progress['bytes'])}, "
                     f"{progress['instances']} files")
    jobs = doc.get("jobs", {})
    running = [j for j in jobs.values()
               if j["series_done"] + j["series_failed"] + j.get("series_lost", 0) < j["series"]]
    if jobs:
        lines.append(f"  prefetch jobs: {len(jobs)}, {len(running)} running")
    for job in running:
        failed = f", {job['series_failed']} failed" if job["series_failed"] else ""
        if job.get("series_lost"):
            failed += f", {job['series_lost']} fetched but evicted again"
        if job.get("series_waiting"):
            failed += f", {job['series_waiting']} failed for now, to be fetched again"
        lines.append(f"    {job['target']}  {job['series_done']} of {job['series']} series"
                     f"{failed}, {format_size(job['bytes'])} of "
                     f"{format_size(job['total_bytes'])}")
    return "\n".join(lines)


def _archives(doc: dict[str, Any]) -> list[str]:
    """The catalog a mount lists from, and the bytes received from each archive."""
    lines = []
    if doc.get("catalog"):
        version = doc.get("catalog_version")
        lines.append(f"  catalog  {doc['catalog']}"
                     + (f", idc-index-data {version}" if version else ", version unknown"))
    traffic = doc.get("traffic", {})
    if traffic:
        lines.append("  received " + ", ".join(f"{format_size(got)} from {name}"
                                               for name, got in sorted(traffic.items())))
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run(mountpoint: Path | None, as_json: bool) -> int:
    targets = [mountpoint] if mountpoint else own_mounts()
    if not targets:
        print("tciafs: no tciafs mount of yours found", file=sys.stderr)
        return 1
    docs = {}
    for target in targets:
        try:
            docs[str(target)] = read_status(target)
        except OSError as exc:
            print(f"tciafs: {target}: not a running tciafs mount ({exc.strerror})",
                  file=sys.stderr)
            if mountpoint is not None:
                return 1
    if not docs:
        return 1
    if as_json:
        print(json.dumps(docs if mountpoint is None else docs[str(mountpoint)], indent=2))
    else:
        print("\n".join(render(Path(k), v) for k, v in docs.items()))
    return 0
