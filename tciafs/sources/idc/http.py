"""The transport to S3: one pooled httpx client, a cap on requests in flight, retries.

S3 asks clients to retry 500 InternalError and 503 SlowDown with exponential back-off
(it sends no Retry-After), and so do 502 and 504 from whatever stands between. Those,
and connections that fail or drop before the headers, are retried here under one
deadline per request, with the project's back-off rule (tciafs.backoff) and full
jitter. Every other status goes back to the caller, which knows what a 404 or a 416
means for its operation. A body cut short is the caller's to resume: an object never
changes, so the rest can be asked for by range.

Requests are anonymous: no credentials are ever read or sent.

Guesses fetched ahead of a reader (tciafs.sources.lanes) ride a lane of their own,
AHEAD_CONNECTIONS beside the `max_connections` of readers and series fetches: a reader's
request never waits behind a guess, and the cap users set still bounds everything else.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import trio

from tciafs.backoff import Backoff
from tciafs.sources import lanes, streamed
from tciafs.sources.base import ServerError

from .s3xml import parse_error

log = logging.getLogger("tciafs.idc")

RETRY_STATUSES = frozenset({500, 502, 503, 504})
_ERROR_BODY_CAP = 16 * 1024
# Connections for guesses, beside the reader's. A header scan waits out one round trip
# per file unless the next headers are in flight (bench figure 12b); public S3 scales
# per prefix to thousands of requests a second, and s5cmd runs hundreds of workers by
# default, so two dozen small ranged GETs at once are ordinary use of the buckets.
# NBIA's transport has no such lane: its service asks for few connections.
AHEAD_CONNECTIONS = 24


@dataclass
class S3Stats:
    """Counters for `tciafs status`: cheap to update, safe to read at any time."""

    requests: Counter[str] = field(default_factory=Counter)  # HTTP attempts per operation
    errors: Counter[str] = field(default_factory=Counter)  # requests that failed for good
    retries: int = 0  # attempts repeated after a transient failure
    resumes: int = 0  # bodies cut short and continued by range
    bytes_received: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"requests": dict(self.requests), "requests_total": sum(self.requests.values()),
                "errors": dict(self.errors), "retries": self.retries, "resumes": self.resumes,
                "bytes_received": self.bytes_received}


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # after the first attempt; also the most resumes of one body
    backoff: Backoff = Backoff(base=0.25, cap=20.0, jitter=1.0)
    deadline: float = 300.0  # seconds for one request, its retries included


@dataclass
class Request:
    method: str
    url: str
    operation: str  # "GetObject": the stats' key
    what: str  # for logs and errors: the operation and the object
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None


class Opened:
    """An answer whose headers arrived; its body is unread and it holds a slot."""

    def __init__(self, transport: Transport, response: httpx.Response, borrower: _Slot) -> None:
        self.response = response
        self._transport = transport
        self._borrower = borrower
        self._closed = False

    @property
    def status(self) -> int:
        return self.response.status_code

    async def read_capped(self, cap: int = _ERROR_BODY_CAP) -> bytes:
        """Up to `cap` bytes of the body (an error document); a failure is no news."""
        return await streamed.read_capped(self.response, cap)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await streamed.close(self.response, self._closed_after)

    def _closed_after(self, got: int) -> None:
        self._transport.release(self._borrower)
        self._transport.stats.bytes_received += got


class Transport:
    def __init__(self, *, max_connections: int = 8, ahead_connections: int = AHEAD_CONNECTIONS,
                 timeout: float = 30.0, policy: RetryPolicy | None = None,
                 stats: S3Stats | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`ahead_connections`: the guesses' own lane (0: they share the readers')."""
        self.policy = policy or RetryPolicy()
        self.stats = stats if stats is not None else S3Stats()
        self.limiter = trio.CapacityLimiter(max_connections)
        self.ahead_limiter = (trio.CapacityLimiter(ahead_connections) if ahead_connections
                              else self.limiter)
        pool = max_connections + ahead_connections
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool,
                              keepalive_expiry=30.0)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), limits=limits,
            transport=transport, headers={"User-Agent": "tciafs"})

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._client.aclose()

    async def open(self, request: Request) -> Opened:
        """The first answer that is not transient, its body unread; `aclose()` it.
        ServerError when every attempt failed or the deadline passed."""
        deadline = trio.current_time() + self.policy.deadline
        retry = 0
        while True:
            outcome = await self._attempt(request, deadline)
            if isinstance(outcome, Opened):
                return outcome
            if retry >= self.policy.retries or trio.current_time() >= deadline:
                self._give_up(request, retry, outcome)
            delay = self.policy.backoff.delay(retry)
            if trio.current_time() + delay >= deadline:
                self._give_up(request, retry, outcome)
            retry += 1
            self.stats.retries += 1
            log.debug("%s: %s; retry %d in %.2f s", request.what, outcome.reason, retry, delay)
            await trio.sleep(delay)

    async def fetch(self, request: Request) -> tuple[int, httpx.Headers, bytes]:
        """Status, headers and the whole body of the first answer that is not transient.
        A body cut short is asked for again, as a transient failure."""
        for retry in range(self.policy.retries + 1):
            opened = await self.open(request)
            try:
                return opened.status, opened.response.headers, await opened.response.aread()
            except httpx.RequestError as exc:
                reason = f"body cut short ({type(exc).__name__})"
                if retry == self.policy.retries:
                    self._give_up(request, retry, _Failure(reason, None))
                self.stats.retries += 1
                await trio.sleep(self.policy.backoff.delay(retry))
            finally:
                await opened.aclose()
        raise AssertionError("unreachable")

    async def _attempt(self, request: Request, deadline: float) -> Opened | _Failure:
        borrower = _Slot(self.ahead_limiter if lanes.guessing() else self.limiter)
        self.stats.requests[request.operation] += 1
        response: httpx.Response | None = None
        try:
            with trio.move_on_at(deadline):
                await borrower.limiter.acquire_on_behalf_of(borrower)
                built = self._client.build_request(request.method, request.url,
                                                   params=request.params,
                                                   headers=request.headers)
                response = await self._client.send(built, stream=True)
        except httpx.RequestError as exc:
            self.release(borrower)
            return _Failure(f"{type(exc).__name__}: {str(exc)[:200]}", None)
        except BaseException:
            self.release(borrower)
            raise
        if response is None:
            self.release(borrower)
            return _Failure("no answer before the deadline", None)
        opened = Opened(self, response, borrower)
        if response.status_code not in RETRY_STATUSES:
            return opened
        error = parse_error(await opened.read_capped())
        await opened.aclose()
        detail = " ".join(part for part in (error.code, error.message) if part)
        return _Failure(f"HTTP {response.status_code}" + (f" {detail}" if detail else ""),
                        response.status_code)

    def _give_up(self, request: Request, retry: int, failure: _Failure) -> None:
        self.stats.errors[request.operation] += 1
        tries = "1 attempt" if retry == 0 else f"{retry + 1} attempts"
        raise ServerError(f"{request.what}: {failure.reason} (gave up after {tries})",
                          status=failure.status)

    def release(self, borrower: _Slot) -> None:
        # A RuntimeError means the attempt was cancelled before a slot was granted.
        with contextlib.suppress(RuntimeError):
            borrower.limiter.release_on_behalf_of(borrower)


@dataclass(eq=False)
class _Slot:
    """One attempt's claim on a lane: released to the lane it was taken from."""

    limiter: trio.CapacityLimiter


@dataclass(frozen=True)
class _Failure:
    reason: str
    status: int | None
