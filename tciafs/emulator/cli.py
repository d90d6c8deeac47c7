"""Command line of the emulator (``tciafs emulator`` and ``python -m tciafs.emulator``).

The first line on stdout is the main server's root URL, the second (with
``--nlst-port``) the NLST server's; both appear only once the servers accept
connections.  Everything else (generation progress, request logs) goes to stderr.
The process serves until SIGINT or SIGTERM and then exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tciafs.emulator.auth import UserDB
from tciafs.emulator.faults import FaultConfig, parse_config
from tciafs.emulator.server import EmulatorServers, Options

if TYPE_CHECKING:
    from tciafs.emulator.model import Archive

PROFILES = ("demo", "scale", "bench")


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


def fault_config(args: argparse.Namespace) -> FaultConfig:
    patch: dict[str, object] = {}
    if args.faults:
        raw = args.faults
        text = Path(raw[1:]).read_text(encoding="utf-8") if raw.startswith("@") else raw
        patch = json.loads(text)
    if args.latency_ms is not None:
        patch["latency_ms"] = args.latency_ms
    if args.bandwidth is not None:
        patch["bandwidth"] = args.bandwidth
    return parse_config(patch, FaultConfig())


def options(args: argparse.Namespace) -> Options:
    return Options(host=args.host, port=args.port, nlst_port=args.nlst_port,
                   token_lifetime=args.token_lifetime, refresh_lifetime=args.refresh_lifetime,
                   users=UserDB.load(args.users_file, ()),
                   faults=fault_config(args), expired_token_mode=args.expired_token_mode,
                   verbose=args.verbose)


def load(args: argparse.Namespace) -> Archive:
    from tciafs.emulator.archive import load_archive  # the generator is heavy; load late

    data_dir = args.data_dir or default_data_dir(args.profile)
    # stdout carries only the URL lines: anything the generator prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return load_archive(args.profile, data_dir)


def run(args: argparse.Namespace, archive: Archive | None = None) -> int:
    """Serve until SIGINT/SIGTERM.  ``archive`` replaces the profile's (for tests)."""
    try:
        opts = options(args)
    except (OSError, ValueError) as exc:
        print(f"tciafs emulator: {exc}", file=sys.stderr)
        return 2
    archive = archive if archive is not None else load(args)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmulatorServers(archive, opts) as servers:
            print(servers.url, flush=True)
            if servers.nlst_url:
                print(servers.nlst_url, flush=True)
            while not stop.wait(0.5):
                pass
    except OSError as exc:  # e.g. the port is taken
        print(f"tciafs emulator: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tciafs emulator",
                                     description="An NBIA-compatible server for tests and demos.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
