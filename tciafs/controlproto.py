"""The control protocol between a running mount and the commands that talk to it.

Both sides import this module: the daemon (tciafs.controlserver listens, tciafs.fs
answers, tciafs.control carries out) and the commands (`tciafs status`, `tciafs cache
...`, `tciafs logout`). The commands must start fast and never load the daemon, so it
imports the standard library only.

- Status: the mount root answers the xattr `user.tciafs.status` with a JSON document,
  a read, which the kernel lets through on the read-only mount (S3QL, too, talks to its
  daemon through the file system rather than a network port).
- Commands: the mount is read-only (`ro`), and the kernel refuses every setxattr on it
  before the daemon sees one, so commands travel over an abstract Unix socket whose
  address the status document gives (CONTROL_KEY): no file to clean up, nothing on the
  network, and only the mount's own user and root are answered. A request is one JSON
  object {"command": ..., "target": ...}; the target is a path relative to the mount
  root, or a bare Study/Series UID; for "drop", the SOP Instance UIDs of the files to
  drop, one a line. The daemon hands it to the handler of the xattr
  `user.tciafs.<command>` on its hidden control file `.__tciafs__`, so every command
  and its errors are the same as through a setxattr.
- Answers: {"errno": N}, 0 for success, else one of the errnos below, so that callers
  handle a failure as that of a system call.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
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

DROP_BATCH = 500  # SOP UIDs per request
CONTROL_KEY = "control"  # the status document's key for the control socket's address
MAX_MESSAGE = 16 << 20  # a request names SOP UIDs by the thousand at most
# A daemon answers its status from memory within milliseconds; one that takes this long is
# stopped or stuck, and a command asking every mount of the user must not wait on it.
STATUS_TIMEOUT = 15.0


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


def new_address() -> str:
    """A fresh abstract socket name; '@' stands for its leading NUL, as in systemd."""
    return f"@tciafs-control-{os.getpid()}-{os.urandom(6).hex()}"


def socket_address(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def encode_request(command: str, target: str) -> bytes:
    return json.dumps({"command": command, "target": target}).encode()


def decode_request(data: bytes) -> tuple[str, str]:
    """(command, target); ValueError for anything else."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str)
                                            for k in ("command", "target")):
        raise ValueError("not a control request")
    return doc["command"], doc["target"]


def encode_reply(code: int) -> bytes:
    return json.dumps({"errno": code}).encode()


# -- the commands' side ----------------------------------------------------------------------

def read_status(mountpoint: Path, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
    """The status document of a running mount; OSError when it is none (or not ours),
    and ETIMEDOUT when its daemon does not answer within `timeout` seconds."""
    result: dict[str, Any] = json.loads(_getxattr_within(mountpoint, STATUS_XATTR, timeout))
    return result


def _getxattr_within(path: Path, name: str, timeout: float) -> bytes:
    """os.getxattr, given up after `timeout`: a daemon that is stopped or stuck would hold
    the calling thread in the kernel for as long as it stays so. The asking thread is left
    to the kernel; as a daemon thread it never keeps the command from exiting."""
    answer: list[bytes | OSError] = []

    def ask() -> None:
        try:
            answer.append(os.getxattr(path, name))
        except OSError as exc:
            answer.append(exc)

    asker = threading.Thread(target=ask, name="status", daemon=True)
    asker.start()
    asker.join(timeout)
    if not answer:
        raise OSError(errno.ETIMEDOUT, "the mount's daemon does not answer", str(path))
    if isinstance(answer[0], OSError):
        raise answer[0]
    return answer[0]


def send(mountpoint: Path, command: str, target: str) -> None:
    """Have the mount carry out a command; OSError with one of the errnos above."""
    address = read_status(mountpoint).get(CONTROL_KEY)
    if not address:
        raise OSError(errno.ENOTSUP, "this mount takes no commands", str(mountpoint))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_address(address))
        sock.sendall(encode_request(command, target))
        sock.shutdown(socket.SHUT_WR)  # the end of the request
        reply = _receive_all(sock)
    try:
        code = json.loads(reply)["errno"]
    except (ValueError, KeyError, TypeError):
        code = errno.EIO  # the daemon went away before it answered
    if code:
        raise OSError(code, os.strerror(code), str(mountpoint))


def _receive_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := sock.recv(65536):
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise OSError(errno.EMSGSIZE, "control message too long")
        chunks.append(chunk)
    return b"".join(chunks)
