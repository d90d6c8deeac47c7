"""The grammar of the `tciafs` command: every command and option, and no command's code.

Apart from the commands, so that the commands that need it (the cache commands ask
where a mount would put its cache; mount.tciafs reads the mount options) import it
without importing one another, and so that `tciafs --help` loads nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tciafs import __version__, paths
from tciafs.defaults import MAX_CONNECTIONS, SERIES_CONNECTIONS
from tciafs.emulator import arguments as emulator_arguments

DESCRIPTION = "The `tciafs` command: mount, umount, emulator, cache."


def _add_mount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount TCIA (or the demo archive) read-only",
                       description="Mount TCIA as /<Collection>/<PatientID>/<StudyInstanceUID>/"
                                   "<SeriesInstanceUID>/<SOPInstanceUID>.dcm")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--server", default=None,
                   help="root URL of the NBIA service (default: the public TCIA service)")
    p.add_argument("--site-cache", default=None, metavar="URL",
                   help="a shared site cache (docs/cluster.md) that stands for both TCIA "
                        "servers: the main one at URL, the NLST one at URL/nlst")
    p.add_argument("--nlst-server", default=None,
                   help="root URL of the NLST server (default: the public NLST host)")
    p.add_argument("--api", choices=["v4", "v2", "v1", "legacy"], default="v4",
                   help="API generation to speak (default v4)")
    p.add_argument("--source", choices=["nbia", "idc", "auto"], default="nbia",
                   help="the archive: nbia (TCIA's own service, the default), idc (NCI "
                        "Imaging Data Commons: its catalog and public S3 buckets) or auto "
                        "(NBIA's tree, read from IDC's buckets where IDC holds a series)")
    p.add_argument("--s3-endpoint", default="https://s3.amazonaws.com", metavar="URL",
                   help="with --source idc or auto: the S3 endpoint of the buckets "
                        "(default: AWS's public one)")
    p.add_argument("--idc-catalog", default=None, metavar="PATH|URL",
                   help="with --source idc or auto: idc_index.parquet (collections_index.parquet "
                        "beside it); default: the installed idc-index-data package's")
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
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="concurrent requests to the service, per mount (default "
                        f"{MAX_CONNECTIONS}; see docs/connections.md)")
    p.add_argument("--series-connections", type=int, default=None,
                   help="connections one series may use at once, its ZIP included "
                        f"(default {SERIES_CONNECTIONS}, or 1 with --site-cache; 1: one "
                        "stream per series)")
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
    p = sub.add_parser("emulator", help="run the NBIA emulator (an HTTP server) on loopback")
    emulator_arguments.add_arguments(p)


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
                   help="the one mount to log out (default: every tciafs mount of yours)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tciafs", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tciafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mount(sub)
    _add_umount(sub)
    _add_emulator(sub)
    _add_status(sub)
    _add_login(sub)
    _add_cache(sub)
    return parser


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="inspect and steer the disk cache")
    csub = p.add_subparsers(dest="cache_command", required=True)
    for name, text in (("stats", "size, bound, entries, hit ratio, largest series"),
                       ("verify", "re-check every cached file against its MD5")):
        c = csub.add_parser(name, help=text)
        c.add_argument("--cache-dir", type=Path, default=None)
        c.add_argument("--json", action="store_true")
        if name == "verify":
            c.add_argument("--repair", action="store_true",
                           help="drop the bad files (through the mount that uses the "
                                "cache, if one does), so that the next read fetches "
                                "them again")
    for name, text in (("prefetch", "fetch collections, patients, studies or series now"),
                       ("pin", "fetch and keep: pinned data is never evicted"),
                       ("unpin", "let pinned data be evicted again"),
                       ("clear", "drop cached bytes (everything, or under PATH)")):
        c = csub.add_parser(name, help=text)
        c.add_argument("paths", nargs="*" if name == "clear" else "+", metavar="PATH",
                       help="a path on a mount, or a bare Study/Series UID")
        c.add_argument("--mount", type=Path, default=None,
                       help="the mount that bare UIDs refer to (default: your only one)")
        if name in ("clear", "unpin"):
            c.add_argument("--cache-dir", type=Path, default=None,
                           help="act on this cache directory, which no mount uses: "
                                "PATHs are then Series UIDs")
        if name in ("prefetch", "pin"):
            c.add_argument("--no-wait", dest="wait", action="store_false",
                           help="start the fetch and return")


def mount_parser() -> argparse.ArgumentParser:
    """The `tciafs mount` subparser: the mount options, for mount.tciafs and the config."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["mount"]
    raise RuntimeError("tciafs has no mount command")
