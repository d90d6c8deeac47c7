"""A loopback HTTP server whose every reply a test function writes.

The function takes each request as an `httpx.Request` and returns an `httpx.Response`,
or awaits one (it runs in the server's own trio loop, in a thread of its own). Replies
travel over real TCP and are written byte for byte as given, Content-Length included,
so the client's transport parses hostile replies as it would a server's: a body shorter
than its Content-Length, HTML where JSON belongs, a stream cut part-way. An exception
from the function, or from the reply's body stream, resets the connection (RST), before
the status line or part-way through the body.

One request per connection: every reply says `Connection: close`.
"""

from __future__ import annotations

import http
import inspect
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType

import h11
import httpx
import trio

Handler = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]
_HOP_BY_HOP = {b"connection", b"transfer-encoding", b"keep-alive"}


class ScriptedServer:
    """`with ScriptedServer(handler) as url:` serves until the block ends."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted server did not start")
        return self.url

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)

    async def _serve(self) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            self._ready.set()
            await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            request = await _read_request(stream, self.url)
            if request is None:
                return
            try:
                reply = self.handler(request)
                if inspect.isawaitable(reply):
                    reply = await reply
            except Exception:
                _reset(stream)
                return
            await _write_reply(stream, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away
        finally:
            await stream.aclose()


async def _read_request(stream: trio.SocketStream, root: str) -> httpx.Request | None:
    conn = h11.Connection(h11.SERVER)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return httpx.Request(head.method.decode(), root + head.target.decode(),
                                 headers=list(head.headers), content=bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _write_reply(stream: trio.SocketStream, reply: httpx.Response) -> None:
    try:
        body: bytes | None = reply.content
    except httpx.ResponseNotRead:
        body = None  # a stream of its own, written as it comes
    headers = [(k, v) for k, v in reply.headers.raw if k.lower() not in _HOP_BY_HOP]
    chunked = body is None and not any(k.lower() == b"content-length" for k, _ in headers)
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    headers.append((b"Connection", b"close"))
    reason = _reason(reply.status_code)
    lines = [b"HTTP/1.1 %d %s" % (reply.status_code, reason)]
    lines += [k + b": " + v for k, v in headers]
    await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
    if body is not None:
        await stream.send_all(body)
        return
    try:
        async for chunk in reply.stream:  # type: ignore[union-attr]
            if chunk:
                await stream.send_all(b"%X\r\n%b\r\n" % (len(chunk), chunk) if chunked
                                      else chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise
    except Exception:
        _reset(stream)
        return
    if chunked:
        await stream.send_all(b"0\r\n\r\n")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST, as a crashed server or a broken proxy does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
