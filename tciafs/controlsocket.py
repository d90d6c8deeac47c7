"""How the command line reaches a running mount's control: a Unix socket.

The mount is read-only (`ro`), and the kernel refuses every setxattr on a read-only
mount before the daemon sees it, so commands cannot travel as xattrs on the control
file. The daemon listens on an abstract Unix socket instead (no file to clean up, no
limit on the length of a path) and names it in its status document, an xattr the
kernel lets through, being a read. A request is one JSON object
{"command": ..., "target": ...}; the answer is {"errno": N}, 0 for success, so that
callers handle a failure as they would that of a system call.

This side stays light: the command line imports neither trio nor the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from tciafs import status

STATUS_KEY = "control"  # the status document's key for the socket's address
MAX_MESSAGE = 16 << 20  # a request names SOP UIDs by the thousand at most


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


def send(mountpoint: Path, command: str, target: str) -> None:
    """Have the mount at `mountpoint` carry out `command` on `target`; an OSError with
    the daemon's errno if it fails."""
    address = status.read_status(mountpoint).get(STATUS_KEY)
    if not address:
        raise OSError(errno.ENOTSUP, "this mount takes no commands", str(mountpoint))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_address(address))
        sock.sendall(encode_request(command, target))
        sock.shutdown(socket.SHUT_WR)  # the end of the request
        reply = receive_all(sock)
    try:
        code = json.loads(reply)["errno"]
    except (ValueError, KeyError, TypeError):
        code = errno.EIO  # the daemon went away before it answered
    if code:
        raise OSError(code, os.strerror(code), str(mountpoint))


def receive_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := sock.recv(65536):
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise OSError(errno.EMSGSIZE, "control message too long")
        chunks.append(chunk)
    return b"".join(chunks)
