"""The NBIA emulator's HTTP server: routing, fault wiring, shaping and streaming.

Paths (all case-sensitive, as JAX-RS is):

* ``/nbia-api/services/{v1,v2,v4}/<endpoint>`` and the unversioned "Advanced"
  ``/nbia-api/services/<endpoint>``, see :mod:`tciafs.emulator.nbia`.
* ``/nbia-api/oauth/token``, ``/nbia-api/services/oauth/token``, ``/nbia-api/logout``.
* The legacy Bindaas API ``/services/v4/TCIA/query/<endpoint>`` (no key) and
  ``/services/v3/TCIA/query/<endpoint>`` (``api_key`` header or parameter), see
  :mod:`tciafs.emulator.legacy`.
* ``/_emulator/{stats,reset,faults}`` (see :mod:`tciafs.emulator.faults`).

With ``s3_port``, a third server speaks S3 instead (:mod:`tciafs.emulator.s3`): the
same plumbing, faults and statistics, another :class:`~tciafs.emulator.service.Service`.

Any other path under ``/nbia-api/`` is Jersey's 404 turned into a 500 by NBIA's
catch-all mapper; a wrong method is its 405, likewise a 500.  Paths outside
``/nbia-api``, ``/services`` and ``/_emulator`` get a plain 404.

The token endpoint and logout are faulted like any NBIA endpoint (filter with
``endpoints`` to spare them).
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import socketserver
import struct
import sys
import termios
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from tciafs.emulator import wire, zipstream
from tciafs.emulator.auth import Auth, TokenStore, UserDB
from tciafs.emulator.context import Context, Request
from tciafs.emulator.downloads import CONTENT_FAULTS
from tciafs.emulator.faults import ContentFaults, FaultConfig, FaultPlan, Faults, Stats
from tciafs.emulator.legacy import LEGACY, run_legacy
from tciafs.emulator.model import Archive
from tciafs.emulator.nbia import NBIA, run_nbia
from tciafs.emulator.service import Route, Service
from tciafs.emulator.wire import Reply

if TYPE_CHECKING:
    from tciafs.emulator.s3 import S3Service

SERVICES = "/nbia-api/services/"
TOKEN_PATHS = ("/nbia-api/oauth/token", "/nbia-api/services/oauth/token")
LOGOUT_PATH = "/nbia-api/logout"
LEGACY_RE = re.compile(r"^/services/(v3|v4)/TCIA/query/([^/]+)$")
NOT_FOUND = "HTTP 404 Not Found"



# --- routing -----------------------------------------------------------------------------

def route(ctx: Context, req: Request) -> Route:
    path = req.path
    if path in TOKEN_PATHS:
        return Route("token", "oauth/token", lambda: _token(ctx, req))
    if path == LOGOUT_PATH:
        return Route("logout", "oauth/logout",
                     lambda: ctx.auth.logout(req.headers.get("authorization"), req.merged()))
    legacy = LEGACY_RE.match(path)
    if legacy and legacy[2] in LEGACY:
        version, name = legacy[1], legacy[2]
        return Route(name, f"legacy-{version}/{name}",
                     lambda: run_legacy(ctx, req, version, name))
    if path.startswith(SERVICES):
        api, _, name = path[len(SERVICES):].rpartition("/")
        api = api or "root"
        endpoint = NBIA.get(name)
        if endpoint is not None and api in endpoint.apis:
            return Route(name, f"{api}/{name}", lambda: run_nbia(ctx, req, api, name))
    if path.startswith(("/nbia-api/", "/services/")):
        return Route("unknown", "unknown/unknown", lambda: wire.server_error(NOT_FOUND))
    return Route("unknown", "unknown/unknown", lambda: wire.text(404, "Not Found"))


def _token(ctx: Context, req: Request) -> Reply:
    if req.method != "POST":
        return wire.server_error("HTTP 405 Method Not Allowed")
    return ctx.auth.token_endpoint(req.merged())


def control(ctx: Context, req: Request) -> Reply:
    """The /_emulator/ paths."""
    name = req.path[len("/_emulator/"):]
    if name == "stats" and req.method == "GET":
        return wire.jackson(ctx.stats.snapshot())
    if name == "reset" and req.method == "POST":
        ctx.stats.reset()
        return wire.jackson(ctx.stats.snapshot())
    if name == "faults" and req.method == "GET":
        return wire.jackson(ctx.faults.config.to_json())
    if name == "faults" and req.method == "POST":
        try:
            patch = json.loads(req.body.decode("utf-8", "replace") or "{}")
            return wire.jackson(ctx.faults.update(patch).to_json())
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            reply = wire.jackson({"error": str(exc)})
            reply.status = 400
            return reply
    return wire.text(404, "Not Found")


class NbiaService:
    """The NBIA servers' service: its routes, NBIA's error pages."""

    def route(self, ctx: Context, req: Request) -> Route:
        return route(ctx, req)

    def fault_reply(self, plan: FaultPlan) -> Reply | None:
        return None

    def crash_reply(self, exc: Exception) -> Reply:
        return wire.server_error(f"{type(exc).__name__}: {exc}")  # NBIA's catch-all mapper

    def control(self, ctx: Context, req: Request) -> Reply | None:
        return None


NBIA_SERVICE = NbiaService()


# --- HTTP plumbing -----------------------------------------------------------------------

def fault_reply(plan: FaultPlan) -> Reply:
    status = plan.status or 500
    if status == 429:
        return Reply(429, b"Too Many Requests", "text/plain",
                     [("Retry-After", str(plan.retry_after))])
    if status == 500:
        return wire.server_error("Injected fault")
    titles = {404: "404 Not Found", 502: "502 Bad Gateway",
              503: "503 Service Temporarily Unavailable", 504: "504 Gateway Time-out"}
    page = (f"<html><head><title>{titles[status]}</title></head><body><center><h1>"
            f"{titles[status]}</h1></center></body></html>\n")
    return Reply(status, page.encode(), "text/html")


class _BodyWriter:
    """Writes one body: throttled, counted, chunk-framed, and cut when a fault says so.

    One chunk is always held back, so an injected cut can land before the last byte
    even when the body turns out shorter than the planned cut point.
    """

    def __init__(self, handler: Handler, plan: FaultPlan, chunked: bool, size_hint: int):
        self._handler = handler
        self._plan = plan
        self._chunked = chunked
        self._cut_at = int(size_hint * plan.cut_fraction) if plan.cut and size_hint else None
        self._pending: bytes | None = None
        self._sent = 0  # payload bytes
        self._raw_sent = 0  # bytes on the wire, for the bandwidth cap
        self._started = 0.0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is not None:
            self._emit(self._pending)
        self._pending = bytes(data)

    def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self._plan.cut:
            self._payload(pending[: len(pending) // 2])
            self._cut()
        if pending is not None and self._plan.last_byte_delay > 0:
            self._payload(pending[:-1])
            pending = pending[-1:]
            ctx = self._handler.server.ctx
            ctx.stats.fault(ctx.host, "slow_last_byte")
            time.sleep(self._plan.last_byte_delay)
        if pending is not None:
            self._payload(pending)
        if self._plan.cut:
            self._cut()
        if self._chunked:
            self._raw(b"0\r\n\r\n")

    def _emit(self, data: bytes) -> None:
        if self._cut_at is not None and self._sent + len(data) > self._cut_at:
            self._payload(data[: max(0, self._cut_at - self._sent)])
            self._cut()
        self._payload(data)

    def _payload(self, data: bytes) -> None:
        if not data:
            return
        framed = b"%X\r\n%b\r\n" % (len(data), data) if self._chunked else data
        self._raw(framed)
        self._sent += len(data)
        self._handler.count_bytes(len(data))

    def _raw(self, data: bytes) -> None:
        bandwidth = self._plan.bandwidth
        try:
            if bandwidth <= 0:
                self._handler.wfile.write(data)
                return
            if not self._started:
                self._started = time.monotonic()
            step = max(1024, min(65536, bandwidth // 20))
            for start in range(0, len(data), step):
                piece = data[start:start + step]
                self._handler.wfile.write(piece)
                self._raw_sent += len(piece)
                delay = self._started + self._raw_sent / bandwidth - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except OSError as exc:  # the client went away
            self._handler.close_connection = True
            raise zipstream.StreamAborted("client disconnected") from exc

    def _cut(self) -> None:
        self._handler.cut_connection(self._plan.cut or "truncate")
        raise zipstream.StreamAborted(self._plan.cut)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tciafs-emulator"
    server: EmulatorHTTPServer
    timeout = 120  # seconds a connection may sit idle (or stalled) before it is dropped
    _counted = True

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the second waits
        # for the client's delayed ACK (~40 ms per response).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        ctx, service = self.server.ctx, self.server.service
        req = self._read_request()
        if req is None:
            return
        if req.path.startswith("/_emulator/"):
            reply = service.control(ctx, req) or control(ctx, req)
            self._send(reply, FaultPlan(), counted=False)
            return
        target = service.route(ctx, req)
        ctx.stats.request(ctx.host, target.name, target.qualified)
        ctx.stats.begin(target.name)
        plan = ctx.faults.plan([target.name, target.qualified])
        content = CONTENT_FAULTS.set(ContentFaults(plan))  # bodies are made as they are sent
        try:
            if plan.latency > 0:
                time.sleep(plan.latency)
            if plan.status is not None:
                ctx.stats.fault(ctx.host, str(plan.status))
                reply = service.fault_reply(plan) or fault_reply(plan)
            else:
                reply = self._run(target)
            self._send(reply, plan)
        finally:
            CONTENT_FAULTS.reset(content)
            ctx.stats.end(target.name)

    def _run(self, target: Route) -> Reply:
        try:
            return target.run()
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            return self.server.service.crash_reply(exc)

    def _read_request(self) -> Request | None:
        url = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._read_body(headers)
        if body is None:
            return None
        form: dict[str, list[str]] = {}
        if "application/x-www-form-urlencoded" in headers.get("content-type", ""):
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"),
                                         keep_blank_values=True)
        return Request(self.command, urllib.parse.unquote(url.path),
                       urllib.parse.parse_qs(url.query, keep_blank_values=True), form, headers,
                       body)

    def _read_body(self, headers: dict[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(400, "Bad Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                self.send_error(400, "Bad chunk")
                return None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _send(self, reply: Reply, plan: FaultPlan, counted: bool = True) -> None:
        ctx = self.server.ctx
        self._counted = counted
        if plan.first_byte_delay > 0:
            ctx.stats.fault(ctx.host, "slow_first_byte")
            time.sleep(plan.first_byte_delay)
        if plan.cut and (self.command == "HEAD" or reply.stream is None and not reply.body):
            self.cut_connection(plan.cut)  # nothing to cut into: drop before the status
            return
        if self.command == "HEAD":  # the headers GET would send, and no body
            self._send_head(reply, chunked=False)
            return
        unsized = reply.stream is not None and reply.length is None
        # HTTP/1.0 has no chunked coding: such a body ends when the connection closes.
        chunked = unsized and self.request_version != "HTTP/1.0"
        if unsized and not chunked:
            self.close_connection = True
        self._send_head(reply, chunked)
        writer = _BodyWriter(self, plan, chunked, reply.size_hint or len(reply.body))
        try:
            if reply.stream is None:
                writer.feed(reply.body)
            else:
                reply.stream(writer.feed)
            writer.finish()
        except zipstream.StreamAborted:
            self.close_connection = True
        except Exception:  # headers are out: all we can do is end the connection
            traceback.print_exc(file=sys.stderr)
            self.cut_connection("truncate", count=False)

    def _send_head(self, reply: Reply, chunked: bool) -> None:
        if self._counted:
            self.server.ctx.stats.status(self.server.ctx.host, reply.status)
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif reply.stream is not None and reply.length is None:
            self.send_header("Connection", "close")
        elif reply.status not in (204, 304):
            length = reply.length if reply.stream is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def count_bytes(self, nbytes: int) -> None:
        if self._counted:
            self.server.ctx.stats.sent(self.server.ctx.host, nbytes)

    def cut_connection(self, kind: str, count: bool = True) -> None:
        """End the connection abruptly: RST for "reset", FIN for "truncate"."""
        ctx = self.server.ctx
        if count:
            ctx.stats.fault(ctx.host, kind)
        self.close_connection = True
        sock = self.connection
        try:
            if kind == "reset":
                _wait_until_sent(sock)  # let the partial body reach the client first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.server.ctx.verbose:
            # Redact api_key values: they are credentials.
            message = re.sub(r"(api_key=)[^&\s\"]*", r"\1***", format % args)
            sys.stderr.write(f"[{self.server.ctx.host}] {self.address_string()} {message}\n")


def _wait_until_sent(sock: socket.socket, limit: float = 0.5) -> None:
    request = getattr(termios, "TIOCOUTQ", None)  # Linux: bytes not yet sent
    if request is None:
        return
    deadline = time.monotonic() + limit
    buf = bytearray(struct.calcsize("i"))
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(sock.fileno(), request, buf)
        except OSError:
            return
        if struct.unpack("i", buf)[0] == 0:
            return
        time.sleep(0.005)


class S3Handler(Handler):
    """The S3 server's handler: HEAD too, and the methods that S3 refuses to strangers."""

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx: Context,
                 service: Service = NBIA_SERVICE,
                 handler: type[Handler] = Handler) -> None:
        self.ctx = ctx
        self.service = service
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the host, which may block on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{self.server_port}" if ":" in host else \
            f"http://{host}:{self.server_port}"


# --- starting and stopping ---------------------------------------------------------------

@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    nlst_port: int | None = None
    s3_port: int | None = None  # an S3 server for the archive's IDC side (tciafs.emulator.s3)
    token_lifetime: float = 7200.0
    refresh_lifetime: float | None = None
    users: UserDB = field(default_factory=UserDB)
    faults: FaultConfig = field(default_factory=FaultConfig)
    expired_token_mode: str = "swallow"
    verbose: bool = False


class EmulatorServers:
    """The main server, and the optional NLST and S3 servers, serving from daemon
    threads; they share the faults and the statistics."""

    def __init__(self, archive: Archive, options: Options) -> None:
        tokens = TokenStore(options.token_lifetime, options.refresh_lifetime)
        auth, faults, stats = Auth(options.users, tokens), Faults(options.faults), Stats()
        self.servers: list[EmulatorHTTPServer] = []
        self.s3: S3Service | None = None
        ports = [("main", options.port)]
        if options.nlst_port is not None:
            ports.append(("nlst", options.nlst_port))
        if options.s3_port is not None:
            # The IDC side plans the series only IDC holds: the generator, loaded only here.
            from tciafs.emulator.s3 import S3Service

            ports.append(("s3", options.s3_port))
            self.s3 = S3Service.for_archive(archive)
        try:
            for host, port in ports:
                # An archive may bound the ZIPs kept for replay (nlst keeps its memory small).
                kept = getattr(archive, "zip_cache_bytes", zipstream.BODY_CACHE_BYTES)
                ctx = Context(archive, host, auth, faults, stats, options.expired_token_mode,
                              options.verbose, zipstream.BodyCache(kept))
                if host == "s3" and self.s3 is not None:
                    server = EmulatorHTTPServer((options.host, port), ctx, self.s3, S3Handler)
                else:
                    server = EmulatorHTTPServer((options.host, port), ctx)
                self.servers.append(server)
                stats.register(host)
        except BaseException:
            self.close()
            raise
        self.stats, self.faults, self.auth = stats, faults, auth
        self._threads: list[threading.Thread] = []

    def _url_of(self, host: str) -> str | None:
        return next((s.url for s in self.servers if s.ctx.host == host), None)

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def nlst_url(self) -> str | None:
        return self._url_of("nlst")

    @property
    def s3_url(self) -> str | None:
        """The S3 endpoint: buckets path-style under it, /<bucket>/<key>."""
        return self._url_of("s3")

    def start(self) -> EmulatorServers:
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                      name=f"emulator-{server.ctx.host}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        running = bool(getattr(self, "_threads", None))
        for server in self.servers:
            if running:
                server.shutdown()  # blocks until serve_forever returns: only if it runs
            server.server_close()
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=5)

    def __enter__(self) -> EmulatorServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
