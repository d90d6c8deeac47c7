"""`mount.tciafs`: the mount(8) helper behind `mount -t fuse.tciafs` and /etc/fstab.

mount(8) runs `/sbin/mount.fuse.tciafs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]` (or
`/sbin/mount.tciafs` for `-t tciafs`). The `-o` options become long options of `tciafs mount`
(`cache_size=50G` → `--cache-size 50G`, `debug` → `--debug`), read off its argparse definition
so every mount option works here as soon as it exists; mount(8)'s own options are dropped.
Then `tciafs mount` runs, which daemonises and returns once the mount answers.

SOURCE is `tciafs` (the default server), `demo` (the bundled demo archive) or an http(s) URL
(`--server URL`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from tciafs.parser import mount_parser

# mount(8)'s generic options, systemd's, and ones that mean nothing for a read-only FUSE mount.
# `rw` is among them: mount(8) adds it to every helper call unless `ro` is given, so rejecting
# it would reject every plain fstab line; tciafs always mounts read-only regardless.
NOISE = frozenset({
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
    "rw", "ro", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "sync", "async", "dirsync",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "silent", "loud", "bg", "fg",
})
NOISE_PREFIXES = ("_", "x-", "comment=")  # _netdev, _rnetdev; x-systemd.*, x-gvfs-*; comments
ALIASES = {"noprefetch": "no_prefetch"}
# mount(8) waits for the helper: an option that keeps `tciafs mount` from returning would hang
# it, and the others are internal.
NOT_FROM_FSTAB = frozenset({"foreground", "ready_fd", "help", "mountpoint"})
SOURCES = {"tciafs": [], "demo": ["--demo"]}


class FstabError(ValueError):
    """A SOURCE or -o option tciafs cannot use; the message names it."""


def fstab_to_argv(source: str, mountpoint: str, options: str,
                  parser: argparse.ArgumentParser | None = None,
                  sloppy: bool = False) -> list[str]:
    """The `tciafs` arguments (`mount MOUNTPOINT ...`) for an fstab SOURCE, MOUNTPOINT and -o.

    `parser` is the `tciafs mount` subparser (the real one by default). With `sloppy`
    (mount -s), unknown options are left out with a warning instead of failing the mount.
    """
    parser = parser or mount_parser()
    source_args = _source_args(source)
    option_args: list[str] = []
    for option in split_options(options):
        try:
            option_args += _option_args(option, parser)
        except FstabError as exc:
            if not sloppy:
                raise
            print(f"mount.tciafs: ignoring {exc}", file=sys.stderr)
    if "--server" in source_args and "--server" in option_args:
        raise FstabError(f"source {source} and option server= both name the server; keep one")
    return ["mount", mountpoint, *source_args, *option_args]


def split_options(options: str) -> list[str]:
    """Split `a=b,c,"d=e,f"` at commas outside double quotes, as libmount does."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in options:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _source_args(source: str) -> list[str]:
    if source.startswith(("http://", "https://")):
        return ["--server", source]
    # mount(8) turns a source naming an existing file into its absolute path, so
    # `tciafs` typed in a directory holding ./tciafs arrives as /that/directory/tciafs.
    name = source.rstrip("/").rsplit("/", 1)[-1] if source.startswith("/") else source
    if name in SOURCES:
        return list(SOURCES[name])
    raise FstabError(f"unknown source {source!r}: use tciafs (the TCIA service), demo "
                     "(the bundled demo archive) or an http(s):// URL of an NBIA server")


def _option_args(option: str, parser: argparse.ArgumentParser) -> list[str]:
    name, has_value, value = option.partition("=")
    value = value.strip('"')
    if option in NOISE or option.startswith(NOISE_PREFIXES):
        return []
    name = ALIASES.get(name, name)
    flag = "--" + name.replace("_", "-")
    action = parser._option_string_actions.get(flag)
    if action is None or action.dest in NOT_FROM_FSTAB:
        known = ", ".join(sorted(_known_options(parser)))
        raise FstabError(f"unknown option '{name}' (known: {known})")
    if action.nargs == 0:
        if has_value:
            raise FstabError(f"option '{name}' takes no value (write just '{name}')")
        return [flag]
    if not has_value or not value:
        raise FstabError(f"option '{name}' needs a value ('{name}=...')")
    return [flag, value]


def _known_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s[2:].replace("-", "_") for a in parser._actions if a.dest not in NOT_FROM_FSTAB
            for s in a.option_strings if s.startswith("--")}


def _helper_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount.tciafs", description="mount(8) helper: mount -t fuse.tciafs SOURCE DIR",
        epilog="example fstab line: tciafs /mnt/tcia fuse.tciafs "
               "_netdev,nofail,cache_size=50G,api=v4 0 0")
    p.add_argument("source", help="tciafs, demo or an http(s) URL of an NBIA server")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated options: tciafs mount's long options in snake_case")
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    p.add_argument("-f", dest="fake", action="store_true", help="show, but do not mount")
    p.add_argument("-n", dest="no_mtab", action="store_true", help="accepted and ignored")
    p.add_argument("-v", dest="verbose", action="store_true", help="show the tciafs command")
    p.add_argument("-t", dest="type", default="fuse.tciafs", help="accepted and ignored")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _helper_parser().parse_args(argv)
    try:
        tciafs_argv = fstab_to_argv(args.source, os.path.abspath(args.mountpoint),
                                    ",".join(args.options), sloppy=args.sloppy)
    except FstabError as exc:
        print(f"mount.tciafs: {exc}", file=sys.stderr)
        return 1  # mount(8)'s "incorrect invocation"
    command = [sys.executable, "-m", "tciafs", *tciafs_argv]
    if args.verbose or args.fake:
        print(f"mount.tciafs: {shlex.join(command)}", file=sys.stderr)
    if args.fake:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)  # `tciafs mount` returns once the mount answers


if __name__ == "__main__":
    sys.exit(main())
