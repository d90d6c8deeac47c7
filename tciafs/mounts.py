"""tciafs mounts as the commands see them, from outside any daemon: which are the
caller's, unmounting one, and the lock that keeps one daemon per cache directory.

Light on purpose (the standard library and tciafs.paths): `tciafs status`, `umount`
and the cache commands import it, and must not load the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tciafs import paths

log = logging.getLogger(__name__)

FSTYPE = "fuse.tciafs"


class MountError(Exception):
    """A mount that cannot start; the message is the one line the user sees."""


@dataclass(frozen=True)
class Mounted:
    path: Path
    owner: int | None  # the uid that mounted it, as FUSE reports it


def tciafs_mounts(table: str = "/proc/self/mounts") -> list[Mounted]:
    """Every tciafs mount this process can see, whoever made it."""
    found = []
    with open(table) as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 3 and fields[2] == FSTYPE:
                found.append(Mounted(Path(paths.unescape_mount_field(fields[1])),
                                     _owner(fields[3])))
    return found


def own_mounts(uid: int | None = None) -> list[Path]:
    """The tciafs mounts of the caller (or of `uid`).

    On a shared machine (a cluster's login node) other users' mounts are listed too,
    and a FUSE mount admits no one but its owner: a mount the caller cannot read is not
    theirs, and the commands pass over it.
    """
    uid = os.getuid() if uid is None else uid
    return [m.path for m in tciafs_mounts() if m.owner is None or m.owner == uid]


def _owner(options: str) -> int | None:
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key == "user_id" and value.isdigit():
            return int(value)
    return None


def clear_stale_mount(mountpoint: Path) -> bool:
    """Unmount what a killed daemon left behind ('Transport endpoint is not connected')."""
    try:
        # statvfs always reaches the filesystem; a stat may be answered from cached
        # attributes even when the daemon behind them is gone.
        os.statvfs(mountpoint)
        return False
    except OSError as exc:
        # ECONNABORTED: a request was queued in the moment the connection went away.
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    log.warning("clearing a stale mount at %s left by a daemon that died", mountpoint)
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return True


def unmount(mountpoint: Path) -> int:
    if not os.path.ismount(mountpoint) and not clear_stale_mount(mountpoint):
        print(f"tciafs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        print(f"tciafs: {result.stderr.strip()}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def locked_cache_dir(cache_dir: Path) -> Iterator[None]:
    """One daemon per cache directory: two would each believe they own the bound."""
    paths.private_dir(cache_dir)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"cache directory {cache_dir} is used by another tciafs mount; "
                         "give this one its own --cache-dir") from None
    try:
        yield
    finally:
        os.close(fd)
