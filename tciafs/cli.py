"""The `tciafs` command: mount, umount, emulator, cache."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from tciafs import __version__, cachecmd, config, paths


def _add_mount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount TCIA (or the demo archive) read-only",
                       description="Mount TCIA as /<Collection>/<PatientID>/<StudyInstanceUID>/"
                                   "<SeriesInstanceUID>/<SOPInstanceUID>.dcm")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--server", default=None,
                   help="root URL of the NBIA service (default: the public TCIA service)")
    p.add_argument("--nlst-server", default=None,
                   help="root URL of the NLST server (default: the public NLST host)")
    p.add_argument("--api", choices=["v4", "v2", "v1", "legacy"], default="v4",
                   help="API generation to speak (default v4)")
    p.add_argument("--demo", action="store_true",
                   help="start the bundled emulator with the demo archive and mount that")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where cached files live (default $XDG_CACHE_HOME/tciafs; with "
                        "--demo, $XDG_CACHE_HOME/tciafs-demo, so that the demo and a "
                        "real mount run side by side)")
    p.add_argument("--cache-size", type=paths.parse_size, default=None,
                   help="hard bound on the cache, e.g. 500M or 50G "
                        "(default: 10 GiB or 10%% of the cache disk, whichever is smaller)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch a whole series in the background when one of its files is "
                        "opened (default on; --no-prefetch fetches only opened files)")
    p.add_argument("--credentials-file", type=Path, default=None, metavar="FILE",
                   help='JSON {"user": ..., "password": ...}, mode 0600, for restricted '
                        "collections (see 'Credentials' in the README)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="file (mode 0600) holding the key of the legacy v3 API")
    p.add_argument("--layout", choices=["uid", "descriptive"], default="uid",
                   help="directory names: UIDs (default) or the NBIA Data Retriever's "
                        "descriptive names")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--manifest", type=Path, default=None, metavar="FILE.tcia",
                      help="mount only the series a .tcia manifest lists")
    view.add_argument("--cart", default=None, metavar="NAME",
                      help="mount only the series of a shared cart")
    p.add_argument("--allow-other", action="store_true",
                   help="let other local users read the mount (they use your login and "
                        "cache; see the README before you do)")
    p.add_argument("--listing-ttl", type=float, default=6 * 3600, metavar="SECONDS",
                   help="how long a directory listing is trusted before it is asked "
                        "again (default 21600)")
    p.add_argument("--max-connections", type=int, default=8,
                   help="concurrent requests to the service (default 8)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="network timeout of one request (default 30)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False,
                   help="log every request with its timing")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings file (default $XDG_CONFIG_HOME/tciafs/config.toml)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-file", type=Path, default=None, help=argparse.SUPPRESS)


def _add_umount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("umount", help="unmount a tciafs mount")
    p.add_argument("mountpoint", type=Path)


def _add_emulator(sub: argparse._SubParsersAction) -> None:
    from tciafs.emulator import cli as emulator_cli

    p = sub.add_parser("emulator", help="run the NBIA emulator (an HTTP server) on loopback")
    emulator_cli.add_arguments(p)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show what running mounts are doing")
    p.add_argument("mountpoint", type=Path, nargs="?",
                   help="a tciafs mount (default: every tciafs mount)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_login(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("login", help="check and store a TCIA login for restricted collections")
    p.add_argument("--user", default=None, help="user name (asked for when not given)")
    p.add_argument("--server", default=None,
                   help="root URL whose token endpoint checks the password "
                        "(default: the public TCIA service)")
    p = sub.add_parser("logout", help="forget the stored login")
    p.add_argument("--mount", type=Path, default=None,
                   help="the one mount to log out (default: every running tciafs mount)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tciafs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tciafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mount(sub)
    _add_umount(sub)
    _add_emulator(sub)
    _add_status(sub)
    _add_login(sub)
    cachecmd.add_arguments(sub)
    return parser


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


def _mount_options(args: argparse.Namespace):  # noqa: ANN202
    from tciafs.mount import DEFAULT_NLST_SERVER, DEFAULT_SERVER, MountOptions, default_cache_dir

    return MountOptions(
        mountpoint=args.mountpoint.absolute(),
        server=args.server or DEFAULT_SERVER,
        nlst_server=args.nlst_server or (None if args.server else DEFAULT_NLST_SERVER),
        api=args.api, demo=args.demo,
        cache_dir=(args.cache_dir or default_cache_dir(args.demo)).absolute(),
        cache_size=args.cache_size, prefetch=args.prefetch, listing_ttl=args.listing_ttl,
        max_connections=args.max_connections, timeout=args.timeout, debug=args.debug,
        credentials_file=args.credentials_file, api_key_file=args.api_key_file,
        layout=args.layout, allow_other=args.allow_other, cart=args.cart,
        manifest=args.manifest.absolute() if args.manifest else None)


def _cmd_mount(args: argparse.Namespace, argv: list[str]) -> int:
    from tciafs import mount

    opts = _mount_options(args)
    try:
        if args.foreground:
            setup_logging(args.debug, args.log_file)
            return mount.run_foreground(opts, args.ready_fd)
        return mount.spawn_daemon(argv, opts)
    except mount.MountError as exc:
        print(f"tciafs: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = config.parse_args(build_parser(), argv)
    os.umask(0o077)  # everything tciafs writes is private to the user
    if args.command == "mount":
        return _cmd_mount(args, argv)
    if args.command == "umount":
        from tciafs.mount import unmount

        return unmount(args.mountpoint)
    if args.command in ("login", "logout"):
        from tciafs import login

        return login.run(args)
    if args.command == "cache":
        return cachecmd.run(args)
    if args.command == "status":
        from tciafs import status

        return status.run(args.mountpoint, args.json)
    if args.command == "emulator":
        from tciafs.emulator import cli as emulator_cli

        return emulator_cli.run(args)
    return 2
