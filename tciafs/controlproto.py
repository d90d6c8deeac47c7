"""The control protocol between a running mount and the commands that talk to it.

Both sides import this module: the daemon (tciafs.fs answers, tciafs.control carries
out) and the commands (`tciafs status`, `tciafs cache ...`, `tciafs logout`). The
commands must start fast and never load the daemon, so it imports the standard library
only.

- Status: the mount root answers the xattr `user.tciafs.status` with a JSON document,
  so no network port or socket is needed (S3QL does the same with a control file).
- Commands: a setxattr of `user.tciafs.<command>` on the hidden control file
  `.__tciafs__` at the mount root (owner-writable, so the kernel lets the call through
  on an otherwise read-only tree). The value names the target: a path relative to the
  mount root, or a bare Study/Series UID; for "drop", the SOP Instance UIDs of the
  files to drop, one a line.
- Answers: success, or an errno (below).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CONTROL_NAME = ".__tciafs__"
XATTR_PREFIX = "user.tciafs."  # commands, and the status document of the root
STATUS_XATTR = XATTR_PREFIX + "status"
COMMANDS = ("prefetch", "pin", "unpin", "clear", "logout", "drop")

# The errno a command fails with, by cause.
UNKNOWN_COMMAND = errno.EINVAL
NO_SUCH_TARGET = errno.ENOENT
TOO_LARGE = errno.ENOSPC  # more than the cache can ever hold at once

DROP_BATCH = 500  # SOP UIDs per xattr value, well under the kernel's 64 KiB


def names_uid(target: str) -> bool:
    """Whether a target is a bare Study or Series UID rather than a path on the mount."""
    return "/" not in target and target.count(".") >= 3


def command_of(xattr: str) -> str | None:
    """The command an xattr name carries, or None when it is not one of ours."""
    if not xattr.startswith(XATTR_PREFIX):
        return None
    return xattr.removeprefix(XATTR_PREFIX)


def decode_target(value: bytes) -> str:
    return os.fsdecode(value)


def drop_targets(sops: Sequence[str]) -> Iterator[str]:
    """The targets of the "drop" commands that drop these files, a batch each."""
    for start in range(0, len(sops), DROP_BATCH):
        yield "\n".join(sops[start:start + DROP_BATCH])


def dropped_sops(target: str) -> list[str]:
    return target.split()


def encode_status(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


# -- the commands' side ----------------------------------------------------------------------

def read_status(mountpoint: Path) -> dict[str, Any]:
    """The status document of a running mount; OSError when it is none (or not ours)."""
    result: dict[str, Any] = json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    return result


def send(mountpoint: Path, command: str, target: str) -> None:
    """Have the mount carry out a command; OSError with one of the errnos above."""
    os.setxattr(mountpoint / CONTROL_NAME, XATTR_PREFIX + command, os.fsencode(target))
