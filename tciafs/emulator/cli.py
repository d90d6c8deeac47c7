"""Command line of the emulator (``tciafs emulator`` and ``python -m tciafs.emulator``).

The first line on stdout is the main server's root URL, the next (with
``--nlst-port``) the NLST server's, the next (with ``--s3-port``) the S3 endpoint's;
they appear only once the servers accept connections.  Everything else (generation
progress, request logs) goes to stderr.  The process serves until SIGINT or SIGTERM and
then exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tciafs.emulator.arguments import add_arguments, default_data_dir
from tciafs.emulator.auth import UserDB
from tciafs.emulator.faults import FaultConfig, parse_config
from tciafs.emulator.server import EmulatorServers, Options

if TYPE_CHECKING:
    from tciafs.emulator.model import Archive

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
                   s3_port=args.s3_port,
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
    profile = getattr(archive, "profile", None)
    if args.s3_port is not None and profile is not None and profile.drawn:
        # Its IDC side would list every series of the collection: the whole of it.
        print(f"tciafs emulator: the {args.profile} profile has no IDC side (--s3-port)",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmulatorServers(archive, opts) as servers:
            print(servers.url, flush=True)
            if servers.nlst_url:
                print(servers.nlst_url, flush=True)
            if servers.s3_url:
                print(servers.s3_url, flush=True)
                _note_catalog()
            while not stop.wait(0.5):
                pass
    except OSError as exc:  # e.g. the port is taken
        print(f"tciafs emulator: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _note_catalog() -> None:
    from tciafs.emulator.idccatalog import pyarrow_missing

    why = pyarrow_missing()
    if why is not None:
        print(f"tciafs emulator: no IDC catalog at /_emulator/idc/: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tciafs emulator",
                                     description="An NBIA-compatible server for tests and demos.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
