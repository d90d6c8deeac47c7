"""The transport: one pooled httpx client, retries with back-off, a politeness budget.

Every logical request gets an absolute deadline; each attempt inside it has httpx's
connect/read/pool timeouts. Transient failures (429, 500/502/503/504, connect errors,
resets, bodies cut short) are retried with exponential back-off and full jitter, and a
429's Retry-After is honoured up to a cap. Other statuses go back to the caller, which
knows what a 400 or a 401 means for its endpoint.

A trio.CapacityLimiter bounds the requests in flight, whichever server they go to. Slots
are borrowed per attempt (never while backing off or waiting for a token), on behalf of
a fresh object, so one task may hold a stream and still make another request.

Logging names the request and its timing, never headers or form bodies: tokens,
passwords and API keys only ever travel in those.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
import trio

from tciafs.backoff import Backoff
from tciafs.sources import streamed
from tciafs.sources.base import ServerError

log = logging.getLogger("tciafs.client")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Errors that no retry can heal: a wrong scheme, a redirect loop, a header we cannot send.
_HOPELESS = (httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.LocalProtocolError)
# Errors that mean no connection was made: the server is down or the network is.
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
_ERROR_BODY_CAP = 64 * 1024
_ERROR_BODY_WAIT = 5.0  # seconds

HeaderSource = Callable[[], Awaitable[Mapping[str, str]]]


@dataclass
class ClientStats:
    """Counters for `tciafs status`: cheap to update, safe to read at any time."""

    requests: Counter[str] = field(default_factory=Counter)  # HTTP attempts per endpoint
    errors: Counter[str] = field(default_factory=Counter)  # logical requests that failed
    retries: int = 0
    bytes_received: int = 0
    fallbacks: int = 0  # v2 requests answered by v1 instead
    token_refreshes: int = 0
    empty_rechecks: int = 0  # empty listings asked again after a token refresh

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "errors": dict(self.errors),
            "retries": self.retries,
            "bytes_received": self.bytes_received,
            "fallbacks": self.fallbacks,
            "token_refreshes": self.token_refreshes,
            "empty_rechecks": self.empty_rechecks,
        }


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # retries after the first attempt
    backoff_base: float = 0.5  # seconds; the n-th back-off is uniform in [0, base * 2**n]
    backoff_cap: float = 20.0
    max_retry_after: float = 60.0  # a longer Retry-After is cut to this

    def backoff(self, attempt: int) -> float:
        """The wait before retry `attempt` (1 for the first): full jitter."""
        return Backoff(self.backoff_base, self.backoff_cap, jitter=1.0).delay(attempt - 1)


@dataclass
class Call:
    """One logical HTTP request as the transport sees it."""

    method: str
    url: str
    what: str  # human name for logs and errors: endpoint, main params, server
    endpoint: str  # key for the stats
    params: Mapping[str, str] | None = None
    form: Mapping[str, str] | None = None  # never logged: it may hold a password
    headers: HeaderSource | None = None  # awaited per attempt, before a slot is taken
    retry_on: frozenset[int] = RETRY_STATUSES
    limited: bool = True  # token calls bypass the limiter so they can never starve


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes

    def text_line(self) -> str:
        """The body's first line, short: for error messages."""
        text = self.body.decode("utf-8", errors="replace").strip()
        return (text.splitlines() or [""])[0][:200]


class OpenResponse:
    """A response whose headers arrived and whose body is still to read; holds a slot."""

    def __init__(self, transport: Transport, call: Call, response: httpx.Response,
                 borrower: object | None, started: float) -> None:
        self.transport = transport
        self.call = call
        self.response = response
        self._borrower = borrower
        self._started = started
        self._closed = False

    @property
    def status(self) -> int:
        return self.response.status_code

    async def read_error_body(self) -> Reply:
        """Read a (small) error body for its message; a failure reading it is no news."""
        # Only the message is wanted: a stalled error body must not hold up the retry.
        body = await streamed.read_capped(self.response, _ERROR_BODY_CAP, _ERROR_BODY_WAIT)
        return Reply(self.status, self.response.headers, body)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await streamed.close(self.response, self._closed_after)

    def _closed_after(self, got: int) -> None:
        self.transport._release(self._borrower)
        self.transport.stats.bytes_received += got
        log.debug("%s: closed after %d B in %.2f s", self.call.what, got,
                  trio.current_time() - self._started)


class Transport:
    def __init__(self, *, max_connections: int = 8, timeout: float = 30.0,
                 policy: RetryPolicy | None = None, stats: ClientStats | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.stats = stats if stats is not None else ClientStats()
        self.limiter = trio.CapacityLimiter(max_connections)
        # Two spare connections for the token calls that bypass the limiter.
        limits = httpx.Limits(max_connections=max_connections + 2,
                              max_keepalive_connections=max_connections + 2,
                              keepalive_expiry=30.0)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=limits, follow_redirects=True, transport=transport,
            headers={"User-Agent": "tciafs"})
        # Servers (scheme://host:port) whose last request found no connection after all
        # its retries: until one answers, each request tries them once, so that offline
        # a file fails at once instead of after the back-off, and a return is seen at once.
        self._unreachable: dict[str, tuple[float, str]] = {}  # since (epoch), why

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._client.aclose()

    @property
    def unreachable(self) -> dict[str, dict[str, object]]:
        """Servers marked unreachable: since when (epoch seconds) and the last reason."""
        return {origin: {"since": since, "reason": reason}
                for origin, (since, reason) in self._unreachable.items()}

    async def fetch(self, call: Call, deadline: float) -> Reply:
        """The whole body of the first answer that is not transient; retries the rest."""
        attempt = 0
        while True:
            attempt += 1
            opened = await self._attempt(call, deadline, attempt)
            if isinstance(opened, _Failure):
                await self._before_retry(call, attempt, opened, deadline)
                continue
            failure: _Failure | None = None
            try:
                with trio.move_on_at(deadline):
                    body = await opened.response.aread()
                    return Reply(opened.status, opened.response.headers, body)
                failure = _Failure("no complete answer before the deadline", None, None,
                                   final=True)
            except httpx.RequestError as exc:
                # A body cut short (Content-Length not reached, chunked stream broken).
                failure = _Failure(f"body cut short ({_describe(exc)})", None, None)
            finally:
                await opened.aclose()
            await self._before_retry(call, attempt, failure, deadline)

    async def open(self, call: Call, deadline: float) -> OpenResponse:
        """Retries until the headers of a non-transient answer arrive; the body is unread.

        The caller must `aclose()` the result; it holds a slot until then.
        """
        attempt = 0
        while True:
            attempt += 1
            opened = await self._attempt(call, deadline, attempt)
            if not isinstance(opened, _Failure):
                return opened
            await self._before_retry(call, attempt, opened, deadline)

    async def _attempt(self, call: Call, deadline: float,
                       attempt: int) -> OpenResponse | _Failure:
        headers: Mapping[str, str] = {}
        if call.headers is not None:
            with trio.move_on_at(deadline):
                headers = await call.headers()
            if trio.current_time() >= deadline:
                return _Failure("no token before the deadline", None, None, final=True)
        borrower: object | None = object() if call.limited else None
        started = trio.current_time()
        self.stats.requests[call.endpoint] += 1
        response: httpx.Response | None = None
        try:
            with trio.move_on_at(deadline):
                if borrower is not None:
                    await self.limiter.acquire_on_behalf_of(borrower)
                request = self._client.build_request(
                    call.method, call.url, params=call.params, data=call.form, headers=headers)
                response = await self._client.send(request, stream=True)
        except httpx.RequestError as exc:
            self._release(borrower)
            log.debug("%s: %s (attempt %d, %.2f s)", call.what, _describe(exc), attempt,
                      trio.current_time() - started)
            return _Failure(_describe(exc), None, None, final=isinstance(exc, _HOPELESS),
                            unreachable=isinstance(exc, _UNREACHABLE))
        except BaseException:
            self._release(borrower)
            raise
        if response is None:
            self._release(borrower)
            return _Failure("no answer before the deadline", None, None, final=True)
        elapsed = trio.current_time() - started
        if self._unreachable:  # parse the URL only when some server is marked
            self._unreachable.pop(_origin(call.url), None)
        log.debug("%s %s → %d (attempt %d, %.2f s to headers)", call.method, call.what,
                  response.status_code, attempt, elapsed)
        opened = OpenResponse(self, call, response, borrower, started)
        if response.status_code not in call.retry_on:
            return opened
        reply = await opened.read_error_body()
        await opened.aclose()
        detail = reply.text_line()
        reason = f"HTTP {response.status_code}" + (f" ({detail})" if detail else "")
        return _Failure(reason, response.status_code, _retry_after(response.headers))

    async def _before_retry(self, call: Call, attempt: int, failure: _Failure,
                            deadline: float) -> None:
        """Sleep before the next attempt, or raise when retrying is pointless."""
        remaining = deadline - trio.current_time()
        if failure.unreachable and _origin(call.url) in self._unreachable:
            self._give_up(call, attempt, failure, "; it could not be reached before either, "
                          "so it is tried once until it answers")
        if failure.final or attempt > self.policy.retries or remaining <= 0:
            self._give_up(call, attempt, failure, "")
        delay = self.policy.backoff(attempt)
        if failure.retry_after is not None:
            wait = min(failure.retry_after, self.policy.max_retry_after)
            if wait > remaining:
                self._give_up(call, attempt, failure,
                              f"; Retry-After {failure.retry_after:.0f} s is past the deadline")
            delay = wait + random.uniform(0.0, self.policy.backoff_base)
        if delay >= remaining:
            self._give_up(call, attempt, failure, "; the deadline would pass while backing off")
        self.stats.retries += 1
        log.debug("%s: %s; retry %d in %.2f s", call.what, failure.reason, attempt, delay)
        await trio.sleep(delay)

    def _give_up(self, call: Call, attempt: int, failure: _Failure, why: str) -> None:
        self.stats.errors[call.endpoint] += 1
        if failure.unreachable:
            origin = _origin(call.url)
            since = self._unreachable.get(origin, (time.time(), ""))[0]
            self._unreachable[origin] = (since, failure.reason)
        tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
        raise ServerError(f"{call.what}: {failure.reason} (gave up after {tries}{why})",
                          status=failure.status)

    def _release(self, borrower: object | None) -> None:
        # A RuntimeError means the attempt was cancelled before a slot was granted.
        if borrower is not None:
            with contextlib.suppress(RuntimeError):
                self.limiter.release_on_behalf_of(borrower)


@dataclass(frozen=True)
class _Failure:
    reason: str
    status: int | None
    retry_after: float | None
    final: bool = False  # the deadline is spent: do not retry
    unreachable: bool = False  # no connection could be made at all


def _origin(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {detail[0][:200]}" if detail else "")


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
