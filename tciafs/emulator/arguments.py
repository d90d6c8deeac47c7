"""The emulator's command-line options, apart from the server: `tciafs --help` shows
them without loading the server, the archive generator or pydicom."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PROFILES = ("demo", "scale", "bench", "nlst")


def default_data_dir(profile: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tciafs" / "emulator" / profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=0, help="port of the main server; 0 picks a free one")
    add("--profile", choices=PROFILES, default="demo", help="archive profile (default demo)")
    add("--data-dir", type=Path, default=None,
        help="where the archive lives (default $XDG_DATA_HOME/tciafs/emulator/<profile>)")
    add("--nlst-port", type=int, default=None,
        help="also serve the NLST collections on this port (0 = free port)")
    add("--s3-port", type=int, default=None,
        help="also serve the archive's IDC side, its S3 buckets and catalog, on this port "
             "(0 = free port)")
    add("--latency-ms", type=float, default=None, help="latency added to every request")
    add("--bandwidth", type=int, default=None, metavar="BYTES_PER_S",
        help="cap on each response body, bytes per second")
    add("--token-lifetime", type=float, default=7200.0, metavar="SECONDS",
        help="access-token lifetime (default 7200)")
    add("--refresh-lifetime", type=float, default=None, metavar="SECONDS",
        help="refresh-token lifetime (default twice the access-token lifetime)")
    add("--users-file", type=Path, default=None,
        help='JSON {"user": {"password": ..., "collections": [...]}, "api_keys": [...]}')
    add("--faults", default=None, metavar="JSON",
        help="initial fault configuration, as JSON or @FILE (see /_emulator/faults)")
    add("--expired-token-mode", choices=("swallow", "401"), default="swallow",
        help="swallow: 200 + empty body where production swallows the 401 (default); "
             "401: answer 401 everywhere")
    add("--verbose", action="store_true", help="log each request to stderr")
