"""The `tciafs` command: mount, umount, emulator, cache.

Only `tciafs mount` and `tciafs emulator` load their heavy parts, and only when they
run: the commands that talk to a running mount (status, cache, umount, logout) stay
light, which a test and the import contracts in pyproject.toml hold them to.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tciafs import cachecmd, config, login, mounts, status
from tciafs.defaults import DEFAULT_NLST_SERVER, DEFAULT_SERVER, SERIES_CONNECTIONS
from tciafs.parser import build_parser

if TYPE_CHECKING:
    from tciafs.spawn import MountOptions

LOG_BYTES = 16 << 20  # a detached daemon's log file, before it is rotated
LOG_BACKUPS = 3


class DaemonLog(logging.handlers.RotatingFileHandler):
    """A detached daemon's log, bounded (a --debug mount logs every request), with its
    stdout and stderr following the current file, so that whatever bypasses logging
    (a traceback at exit) lands beside the rest."""

    def __init__(self, path: Path, max_bytes: int = LOG_BYTES,
                 backups: int = LOG_BACKUPS) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self._follow()

    def doRollover(self) -> None:  # noqa: N802 (the logging module's name)
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        if self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def setup_logging(debug: bool, log_file: Path | None = None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[DaemonLog(log_file) if log_file else logging.StreamHandler(sys.stderr)])
    # httpx logs every request at INFO: our client logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _mount_options(args: argparse.Namespace) -> MountOptions:
    from tciafs.spawn import MountOptions, default_cache_dir

    site_cache = args.site_cache.rstrip("/") if args.site_cache else None

    return MountOptions(
        mountpoint=args.mountpoint.absolute(),
        server=args.server or site_cache or DEFAULT_SERVER,
        nlst_server=args.nlst_server or _nlst_server(args.server, site_cache),
        api=args.api, demo=args.demo,
        cache_dir=(args.cache_dir or default_cache_dir(args.demo)).absolute(),
        cache_size=args.cache_size, prefetch=args.prefetch, listing_ttl=args.listing_ttl,
        max_connections=args.max_connections,
        series_connections=_series_connections(args.series_connections, site_cache),
        timeout=args.timeout, debug=args.debug,
        credentials_file=args.credentials_file, api_key_file=args.api_key_file,
        layout=args.layout, allow_other=args.allow_other, cart=args.cart,
        manifest=args.manifest.absolute() if args.manifest else None,
        source=args.source, s3_endpoint=args.s3_endpoint, idc_catalog=args.idc_catalog)


def _series_connections(asked: int | None, site_cache: str | None) -> int:
    """One stream per series behind a site cache unless asked otherwise: the single
    images fetched beside a series' ZIP are other URLs to the site cache, so every node
    would pull them across the uplink again (docs/connections.md)."""
    if asked is not None:
        return asked
    return 1 if site_cache else SERIES_CONNECTIONS


def _nlst_server(server: str | None, site_cache: str | None) -> str | None:
    """The NLST server when none is named: none beside another --server (which may hold
    no NLST), the site cache's /nlst (contrib/nginx passes it on), else the public one."""
    if server:
        return None
    return f"{site_cache}/nlst" if site_cache else DEFAULT_NLST_SERVER


def _cmd_mount(args: argparse.Namespace, argv: list[str]) -> int:
    from tciafs import spawn

    opts = _mount_options(args)
    try:
        if args.foreground:
            # The daemon, trio and pyfuse3: loaded by the daemon alone; the command that
            # starts it in the background only waits for it to answer.
            from tciafs import mount

            setup_logging(args.debug, args.log_file)
            return mount.run_foreground(opts, args.ready_fd)
        return spawn.spawn_daemon(argv, opts)
    except mounts.MountError as exc:
        print(f"tciafs: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = config.parse_args(build_parser(), argv)
    os.umask(0o077)  # everything tciafs writes is private to the user
    if args.command == "mount":
        return _cmd_mount(args, argv)
    if args.command == "umount":
        return mounts.unmount(args.mountpoint)
    if args.command in ("login", "logout"):
        return login.run(args)
    if args.command == "cache":
        return cachecmd.run(args)
    if args.command == "status":
        return status.run(args.mountpoint, args.json)
    if args.command == "emulator":
        # The emulator's server and archive generator load pydicom: only when it runs.
        from tciafs.emulator import cli as emulator_cli

        return emulator_cli.run(args)
    return 2
