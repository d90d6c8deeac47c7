"""The daemon's end of the control socket (the protocol: tciafs.controlproto).

Each request goes to the very handler a setxattr on the control file reaches, so that
commands, and the errno of each failure, are the same whichever way they come. Only
the mount's own user and root may send them, as only they may write the control file.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct

import pyfuse3
import trio

from tciafs import controlproto
from tciafs.fs import CONTROL_INODE, Operations

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


async def serve(ops: Operations, address: str, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]]
                = trio.TASK_STATUS_IGNORED) -> None:
    """Answer commands on `address` until cancelled; started once it listens."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(controlproto.socket_address(address))
    sock.listen()
    await trio.serve_listeners(functools.partial(_answer, ops),
                               [trio.SocketListener(sock)], task_status=task_status)


async def _answer(ops: Operations, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            code = await _carry_out(ops, stream)
            await stream.send_all(controlproto.encode_reply(code))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the command line went away (Ctrl-C): what it asked for goes on
        except Exception:  # a bug here must not take the whole mount down
            log.exception("control socket: unexpected error")


async def _carry_out(ops: Operations, stream: trio.SocketStream) -> int:
    # Read the request even from a stranger: closing on unread bytes would reset the
    # connection, and the caller would see that instead of the refusal.
    try:
        request = await _receive_all(stream)
    except ValueError:
        return errno.EMSGSIZE
    if not _trusted(stream.socket):
        return errno.EACCES
    try:
        command, target = controlproto.decode_request(request)
    except ValueError:
        return errno.EINVAL
    try:
        await ops.setxattr(CONTROL_INODE, os.fsencode(controlproto.XATTR_PREFIX + command),
                           os.fsencode(target))
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def _trusted(sock: trio.socket.SocketType) -> bool:
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEERCRED.size))
    return uid in (0, os.getuid())


async def _receive_all(stream: trio.SocketStream) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.receive_some(65536):
        size += len(chunk)
        if size > controlproto.MAX_MESSAGE:
            raise ValueError("control request too long")
        chunks.append(chunk)
    return b"".join(chunks)
