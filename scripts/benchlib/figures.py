"""The twelve figures: what each is, in the order of the table, and the function that
measures it. Each compares tciafs with a baseline measured in the same run, under the
same shaping, and keeps the median of its repetitions.

Every timing is time.perf_counter around a real command run as a subprocess (`cp`,
`cat`, `head`, `find`, `curl`, `unzip`, a Python baseline). Cold runs get a fresh cache
directory and a fresh mount; the path down to the copied directory is resolved before
the clock starts (its parents' listings are not part of a copy), the copied directory's
own listing is. Copies are checked byte for byte against the service's MD5s.

The measurements live by kind: fig_copies (1, 2, 3, 8), fig_reads (4, 5, 5b, 6),
fig_walk (7), fig_faults (9, 10), fig_site_cache (11a, 11b), fig_header_scan (12a,
12b), fig_auto (13), fig_idc_copy (14); the steps they share are in steps.
"""

from __future__ import annotations

from .fig_auto import fig13
from .fig_copies import fig1, fig8, fig23
from .fig_faults import fig9, fig10
from .fig_header_scan import fig12
from .fig_idc_copy import fig14
from .fig_reads import can_drop_caches, fig4, fig56
from .fig_site_cache import fig11
from .fig_walk import fig7
from .report import Figure, Target
from .steps import Context, Workspace

# What scripts/bench uses: the declarations, the measuring functions and their context.
__all__ = ["Context", "Workspace", "declare", "number", "fig1", "fig23", "fig4", "fig56",
           "fig7", "fig8", "fig9", "fig10", "fig11", "fig12", "fig13",
           "fig14"]


def declare(nodes: int = 4) -> list[Figure]:
    """The figures in the order of the table; `nodes` is figure 11's node count."""
    return [
        Figure("1_cold_series_copy", "cold `cp -r` of the 200-slice CT series (empty cache) "
               "vs `curl` getImage + `unzip`", "s", Target("<=", 0.5)),
        Figure("2_cold_study_copy", "cold `cp -r` of the 4-series study vs the four "
               "`curl` + `unzip` done one after another", "s", Target("<=", 0.3)),
        Figure("3_study_vs_tcia_utils", "cold `cp -r` of the 4-series study vs tcia_utils' "
               "own downloadSeries (its series in parallel, max_workers=10), or the same "
               "like for like where it is not installed", "s", Target("<=", 0.8)),
        Figure("4_first_byte", "open + read 1 byte (`head -c 1`) of the middle instance of "
               "an uncached series vs `curl` getSingleImage of it", "s", Target("<=", 1.5)),
        Figure("5_warm_read", "`cat` of the cached series after a remount (no page cache) "
               "vs `cat` of the cache's object files; throughput", "MB/s", Target(">=", 0.45)),
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
        Figure("11a_site_cache_upstream_bytes", f"{nodes} nodes (mounts with caches of "
               "their own) copy the 4-series study at once through the site cache (nginx with "
               "contrib/nginx/tciafs-site-cache.conf, cold): bytes the service sent vs the "
               "study's getImage ZIPs", "MB", Target("<=", 1.05)),
        Figure("11b_site_cache_concurrent_copy", f"the same {nodes} concurrent `cp -r`, first "
               "start to last end, vs one node alone copying the study through a cold site "
               "cache", "s", Target("<=", 1.3)),
        Figure("12a_header_scan_bytes", "pydicom `stop_before_pixels` of every file of the "
               "200-slice CT series from IDC's bucket (`--source idc`, empty cache): bytes "
               "fetched vs the series' bytes", "MB", Target("<=", 0.05)),
        Figure("12b_header_scan_time", "the same header scan vs a cold `cp -r` of the series "
               "from another fresh `--source idc` mount", "s", Target("<=", 0.2)),
        Figure("13_auto_vs_nbia_study_copy", "cold `cp -r` of the demo archive's largest "
               "study with `--source auto` (IDC's buckets where IDC holds a series) vs "
               "`--source nbia`, same emulated link", "s", Target("<=", 1.0)),
        Figure("14_idc_cold_series_copy", "cold `cp -r` of the 200-slice CT series from an "
               "IDC mount (--source idc, the emulator's S3 side) vs `curl --parallel` of the "
               "same objects with the same connection cap", "s", Target("<=", 1.1)),
    ]


def number(key: str) -> int:
    return int(key.split("_")[0].rstrip("ab"))

