"""mount.tciafs: fstab -o options to `tciafs mount` options, and mount(8) through the helper."""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tciafs import fstab

from mountutil import can_unshare, needs_fuse

DEFAULT_TIER = "unit"  # one test mounts

MNT = "/mnt/tcia"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return fstab.mount_parser()


def options_argv(options: str, parser: argparse.ArgumentParser, **kw: object) -> list[str]:
    argv = fstab.fstab_to_argv("tciafs", MNT, options, parser, **kw)
    assert argv[:2] == ["mount", MNT]
    return argv[2:]


@pytest.mark.parametrize(("option", "expected"), [
    ("cache_size=50G", ["--cache-size", "50G"]),
    ("api=v4", ["--api", "v4"]),
    ("api=legacy", ["--api", "legacy"]),
    ("no_prefetch", ["--no-prefetch"]),
    ("noprefetch", ["--no-prefetch"]),
    ("debug", ["--debug"]),
    ("demo", ["--demo"]),
    ("server=https://nbia.example.org/x?a=b", ["--server", "https://nbia.example.org/x?a=b"]),
    ("nlst_server=http://127.0.0.1:8001", ["--nlst-server", "http://127.0.0.1:8001"]),
    ("cache_dir=/var/cache/tcia", ["--cache-dir", "/var/cache/tcia"]),
    ("listing_ttl=3600", ["--listing-ttl", "3600"]),
    ("max_connections=4", ["--max-connections", "4"]),
    ("timeout=60", ["--timeout", "60"]),
    ("cache-size=1G", ["--cache-size", "1G"]),  # the CLI spelling works too
    ('server="http://a.example/b,c"', ["--server", "http://a.example/b,c"]),
])
def test_translation(parser, option, expected) -> None:
    assert options_argv(option, parser) == expected


def test_the_example_line_parses_as_tciafs_mount(parser) -> None:
    argv = fstab.fstab_to_argv("tciafs", MNT, "rw,_netdev,nofail,cache_size=50G,api=v4",
                               parser)
    assert argv == ["mount", MNT, "--cache-size", "50G", "--api", "v4"]
    args = parser.parse_args(argv[1:])  # what `tciafs mount` will make of it
    assert (args.mountpoint, args.cache_size, args.api) == (Path(MNT), 50 << 30, "v4")
    assert args.foreground is False  # tciafs mount daemonises, so mount(8) gets control back


def test_new_options_translate_without_changes_here(parser) -> None:
    extended = fstab.mount_parser()
    if "--allow-other" not in extended._option_string_actions:
        extended.add_argument("--allow-other", action="store_true")
    if "--layout" not in extended._option_string_actions:
        extended.add_argument("--layout", choices=["uid", "descriptive"])
    assert options_argv("allow_other,layout=descriptive", extended) == [
        "--allow-other", "--layout", "descriptive"]


NOISE = ("defaults,rw,ro,auto,noauto,user,users,nouser,owner,group,nofail,_netdev,_rnetdev,"
         "exec,noexec,suid,nosuid,dev,nodev,sync,async,atime,noatime,relatime,nodiratime,"
         "strictatime,lazytime,x-systemd.automount,x-systemd.idle-timeout=1min,"
         "x-systemd.requires=network-online.target,x-gvfs-show,comment=systemd.automount,"
         "comment=\"a,b\"")


def test_mount_noise_is_dropped(parser) -> None:
    assert options_argv(NOISE, parser) == []
    assert options_argv(NOISE + ",debug", parser) == ["--debug"]


@pytest.mark.parametrize(("options", "match"), [
    ("cache_sise=50G", r"unknown option 'cache_sise' \(known: .*cache_size"),
    ("_netdev,allow_everything", "unknown option 'allow_everything'"),
    ("prefetch_all", "unknown option 'prefetch_all'"),
    ("foreground", "unknown option 'foreground'"),  # mount(8) would wait for ever
    ("ready_fd=3", "unknown option 'ready_fd'"),
    ("help", "unknown option 'help'"),
    ("debug=1", "'debug' takes no value"),
    ("cache_size", r"'cache_size' needs a value"),
    ("api=", r"'api' needs a value"),
])
def test_unusable_options_are_errors_naming_them(parser, options, match) -> None:
    with pytest.raises(fstab.FstabError, match=match):
        options_argv(options, parser)


def test_sloppy_warns_instead(parser, capsys) -> None:
    assert options_argv("cache_sise=1G,debug", parser, sloppy=True) == ["--debug"]
    assert "ignoring unknown option 'cache_sise'" in capsys.readouterr().err


@pytest.mark.parametrize(("source", "expected"), [
    ("tciafs", []),
    ("demo", ["--demo"]),
    ("https://services.example.org", ["--server", "https://services.example.org"]),
    ("http://127.0.0.1:8000", ["--server", "http://127.0.0.1:8000"]),
    # mount(8) canonicalises a source that names an existing file in its working directory.
    ("/home/me/src/tciafs", []),
    ("/tmp/demo", ["--demo"]),
])
def test_sources(parser, source, expected) -> None:
    assert fstab.fstab_to_argv(source, MNT, "rw", parser) == ["mount", MNT, *expected]


@pytest.mark.parametrize("source", ["nbia", "ftp://x.example", "tcia", ""])
def test_unknown_source_is_an_error(parser, source) -> None:
    with pytest.raises(fstab.FstabError, match="unknown source"):
        fstab.fstab_to_argv(source, MNT, "", parser)


def test_url_source_and_server_option_conflict(parser) -> None:
    with pytest.raises(fstab.FstabError, match="both name the server"):
        fstab.fstab_to_argv("http://a.example", MNT, "server=http://b.example", parser)


def test_split_options_respects_quotes() -> None:
    assert fstab.split_options('a=1,,comment="x,y", b ,c') == ["a=1", 'comment="x,y"', "b", "c"]


def test_helper_fake_and_verbose(capsys) -> None:
    assert fstab.main(["tciafs", MNT, "-f", "-v", "-n", "-o", "rw,_netdev,cache_size=2G"]) == 0
    err = capsys.readouterr().err
    assert f"-m tciafs mount {MNT} --cache-size 2G" in err
    assert err.startswith(f"mount.tciafs: {sys.executable}")


def test_helper_error_exit_code(capsys) -> None:
    assert fstab.main(["tciafs", MNT, "-o", "rw,cache_sise=2G"]) == 1
    assert "mount.tciafs: unknown option 'cache_sise'" in capsys.readouterr().err


def test_helper_makes_relative_mountpoint_absolute(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert fstab.main(["demo", "mnt", "-f"]) == 0
    assert f"mount {tmp_path / 'mnt'} --demo" in capsys.readouterr().err


# -- the real mount(8) -----------------------------------------------------------------------

@needs_fuse
@pytest.mark.mount
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare to install the helper")
def test_mount_t_fuse_tciafs_runs_the_helper(emulator, tmp_path: Path) -> None:
    """`mount -t fuse.tciafs` finds /sbin/mount.fuse.tciafs and the mount serves the archive.

    The helper is installed into a private mount namespace (a directory bound over /usr/sbin),
    so the host's /sbin is never touched and the mount is gone with the namespace.
    """
    sbin, mnt, cache = tmp_path / "sbin", tmp_path / "mnt", tmp_path / "cache"
    for d in (sbin, mnt):
        d.mkdir()
    helper = sbin / "mount.fuse.tciafs"
    helper.write_text(f"#!/bin/sh\nexec {sys.executable} -m tciafs.fstab \"$@\"\n")
    helper.chmod(0o755)
    options = (f"_netdev,nofail,x-systemd.automount,cache_dir={cache},"
               f"nlst_server={emulator.nlst_url},max_connections=4")
    script = f"""
set -e
mount --bind {sbin} /usr/sbin
mount -t fuse.tciafs -o {options} {emulator.url} {mnt}
findmnt -n -o FSTYPE,SOURCE {mnt}
ls {mnt}
umount {mnt}
"""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CACHE_HOME": str(tmp_path / "xc")}
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, env=env, timeout=60)
    log = "\n".join(p.read_text() for p in (tmp_path / "state").rglob("*.log"))
    assert result.returncode == 0, f"{result.stderr}\n{log}"
    found, *listing = result.stdout.splitlines()
    assert found.split() == ["fuse.tciafs", "tciafs"]  # type and fsname, as in /proc/mounts
    assert listing, "the mounted root lists no collections"
    assert not os.path.ismount(mnt)  # the mount stayed inside the namespace
    _wait_for_daemon_exit(cache / "lock")


def _wait_for_daemon_exit(lock: Path, timeout: float = 15.0) -> None:
    """The daemon holds an flock on its cache while it lives: taking it proves it exited."""
    deadline = time.monotonic() + timeout
    fd = os.open(lock, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError("the daemon did not exit after umount") from None
                time.sleep(0.05)
    finally:
        os.close(fd)
