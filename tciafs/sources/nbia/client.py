"""NbiaClient: the public facade over the wire layer.

It picks the API generation's paths and shapes (api.py), sends through the shared
transport (http.py), attaches tokens where the generation wants them (auth.py), routes
each collection to the server that holds it (main or NLST), and turns statuses into
records or errors.

Empty listings and tokens. The real service answers many listing endpoints with 200 and
an empty body when the token has expired, exactly as it does for "nothing here". So:

1. every request asks its TokenManager for a token good for at least the safety margin
   (renewed first if need be), and 401s renew once and retry;
2. an empty listing that came back on a token older than `empty_recheck_age` seconds
   (or one due for renewal) is asked again once on a freshly renewed token, and only
   that second answer is returned.

So an empty list the client returns was obtained on a token at most
`empty_recheck_age` seconds old, or with no token at all (v1, legacy, v4 guest).
`token_may_be_stale()` and `ensure_fresh_token()` let NbiaSource add its own re-check.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from tciafs.sources.base import (
    MAIN_HOST,
    AuthError,
    ClientError,
    Collection,
    NotFound,
    Patient,
    Series,
    ServerError,
    Study,
)

from . import api
from .api import Generation, Request
from .api import generation as api_generation
from .auth import Credentials, Token, TokenManager
from .http import RETRY_STATUSES, Call, ClientStats, OpenResponse, Reply, RetryPolicy, Transport
from .streams import SeriesZipStream, SingleImageStream

log = logging.getLogger("tciafs.client")

MAIN, NLST = MAIN_HOST, "nlst"
_SINGLE_IMAGE_NOT_FOUND = "server was not able to process your request"

Builder = Callable[[Generation], Request]


class NbiaClient:
    """See the module docstring; every public method names its request in its errors."""

    def __init__(self, server: str = "https://services.cancerimagingarchive.net", *,
                 api: str = "v4",
                 nlst_server: str | None = "https://nlst.cancerimagingarchive.net",
                 credentials: Credentials | None = None, api_key: str | None = None,
                 max_connections: int = 8, timeout: float = 30.0, retries: int = 5,
                 request_deadline: float = 300.0, backoff_base: float = 0.5,
                 backoff_cap: float = 20.0, max_retry_after: float = 60.0,
                 token_margin: float = 300.0, empty_recheck_age: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.gen = api_generation(api)
        self.api = self.gen.name
        self.credentials = credentials
        self._api_key = api_key
        self._servers: dict[str, str] = {MAIN: _root(server)}
        if nlst_server:
            self._servers[NLST] = _root(nlst_server)
        self.request_deadline = request_deadline
        self.empty_recheck_age = empty_recheck_age
        self.stats = ClientStats()
        policy = RetryPolicy(retries=retries, backoff_base=backoff_base,
                             backoff_cap=backoff_cap, max_retry_after=max_retry_after)
        self._http = Transport(max_connections=max_connections, timeout=timeout,
                               policy=policy, stats=self.stats, transport=transport)
        # Series ZIPs hold a slot for as long as the caller reads; leave two for the rest
        # so listings and single images never wait behind a batch of long downloads.
        self._series_slots = trio.CapacityLimiter(max(1, max_connections - 2))
        self._tokens: dict[str, TokenManager] = {}
        if self._wants_token(self.gen):
            who = credentials or Credentials.guest()
            for host, root in self._servers.items():
                self._tokens[host] = TokenManager(self._http, root, who, margin=token_margin,
                                                  label=host)
        elif credentials is not None:
            log.warning("API %s sends no token: credentials for %r are not used",
                        self.api, credentials.username)
        self._hosts: dict[str, str] = {}  # collection name (casefolded) -> host
        self._nlst_listed = NLST not in self._servers  # NLST's collections are known
        self._routing_lock = trio.Lock()
        self._fallback_logged: set[str] = set()
        self._image_md5_gone = False  # the service answered that it has no getM5HashForImage

    @property
    def unreachable(self) -> dict[str, dict[str, object]]:
        """Servers that could not be reached lately (see Transport)."""
        return self._http.unreachable

    def __repr__(self) -> str:
        return (f"NbiaClient(server={self._servers[MAIN]!r}, api={self.api!r}, "
                f"nlst_server={self._servers.get(NLST)!r}, user="
                f"{self.credentials.username if self.credentials else None!r})")

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> NbiaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, *, logout: bool = True) -> None:
        """Revoke the tokens this client obtained (errors ignored) and close the pool."""
        try:
            if logout:
                await self.logout()
        finally:
            await self._http.aclose()

    async def logout(self) -> None:
        for manager in self._tokens.values():
            await manager.logout()

    async def become_guest(self) -> None:
        """Revoke the user's tokens and go on as the public guest (`tciafs logout`)."""
        await self.logout()
        self.credentials = None
        for manager in self._tokens.values():
            manager.credentials = Credentials.guest()

    async def start(self) -> None:
        """Log in where needed and check that the main server answers.

        Raises AuthError or ServerError with a one-line reason. An NLST server that does
        not answer is logged, not fatal: its collections are left out of listings.
        """
        manager = self._tokens.get(MAIN)
        if manager is not None:
            await manager.login()
        await self.collections()

    @property
    def tokens(self) -> dict[str, TokenManager]:
        """The token managers by host ("main", "nlst"); empty when no token is sent."""
        return dict(self._tokens)

    async def run_token_refresher(self, *, task_status: trio.TaskStatus[None]
                                  = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every token before expiry, forever (a background task for the daemon)."""
        async with trio.open_nursery() as nursery:
            for manager in self._tokens.values():
                await nursery.start(manager.run_refresher)
            task_status.started()

    async def ensure_fresh_token(self) -> None:
        """Make sure each token in use has at least its safety margin left."""
        for host, manager in self._tokens.items():
            if host == MAIN or manager.token is not None:
                await manager.ensure_fresh()

    @property
    def has_nlst_server(self) -> bool:
        return NLST in self._servers

    def token_may_be_stale(self) -> bool:
        """True when a token in use is due for renewal or its last renewal failed.

        An empty listing obtained while this is true deserves a second look after
        `ensure_fresh_token()`. (The client itself already re-asks empty listings that
        came back on a token older than `empty_recheck_age`.)
        """
        return any(manager.is_stale() for manager in self._tokens.values())

    # -- routing -------------------------------------------------------------------------

    def remember_hosts(self, collections: Iterable[Collection]) -> None:
        """Seed collection→server routing, e.g. from a persisted catalog, to spare a listing."""
        for item in collections:
            self._hosts[item.name.casefold()] = item.host
            if item.host == NLST:
                self._nlst_listed = True

    def host_of(self, collection: str) -> str | None:
        return self._hosts.get(collection.casefold())

    async def _host_for(self, collection: str) -> str:
        host = self._hosts.get(collection.casefold())
        if host is not None:
            return host
        if NLST not in self._servers:
            return MAIN
        async with self._routing_lock:
            if collection.casefold() not in self._hosts and not self._nlst_listed:
                await self.collections()
        host = self._hosts.get(collection.casefold())
        if host is not None:
            return host
        if not self._nlst_listed:
            raise ServerError(f"cannot tell which server holds collection {collection!r}: "
                              f"the NLST server {self._servers[NLST]} does not answer")
        return MAIN  # unknown anywhere: main answers, with an empty listing

    # -- listings ------------------------------------------------------------------------

    async def collections(self) -> list[Collection]:
        """Collections of the main server, then those only the NLST server holds."""
        found = await self._collections_on(MAIN)
        names = {c.name.casefold() for c in found}
        if NLST in self._servers:
            try:
                nlst = await self._collections_on(NLST)
            except ClientError as exc:
                log.warning("NLST server %s: %s; its collections are left out",
                            self._servers[NLST], exc)
            else:
                found += [c for c in nlst if c.name.casefold() not in names]
                self._nlst_listed = True
        self.remember_hosts(found)
        return found

    async def _collections_on(self, host: str) -> list[Collection]:
        rows, _gen, what = await self._rows(api.collections_request, host)
        return api.parse_collections(rows, host, what)

    async def patients(self, collection: str, patient_id: str | None = None) -> list[Patient]:
        host = await self._host_for(collection)
        rows, _gen, what = await self._rows(
            lambda g: api.patients_request(g, collection, patient_id), host)
        found = (api.parse_patient(row, collection, what) for row in rows)
        return [p for p in found if p is not None and _same(p.collection, collection)
                and (patient_id is None or _same(p.patient_id, patient_id))]

    async def studies(self, collection: str, patient_id: str | None = None) -> list[Study]:
        host = await self._host_for(collection)
        rows, gen, what = await self._rows(
            lambda g: api.studies_request(g, collection, patient_id), host)
        found = (api.parse_study(row, gen, collection, patient_id, what) for row in rows)
        # v1/v2 ignore parameters they do not know and answer unfiltered: filter again.
        return [s for s in found if s is not None and _same(s.collection, collection)
                and (patient_id is None or _same(s.patient_id, patient_id))]

    async def series(self, collection: str, patient_id: str | None = None,
                     study_uid: str | None = None) -> list[Series]:
        """Series of a collection (one request describes the whole collection)."""
        host = await self._host_for(collection)
        rows, gen, what = await self._rows(
            lambda g: api.series_request(g, collection, patient_id, study_uid), host)
        found = (api.parse_series(row, gen, collection, what) for row in rows)
        return [s for s in found if s is not None and _same(s.collection, collection)
                and (patient_id is None or _same(s.patient_id, patient_id))
                and (study_uid is None or s.study_uid == study_uid)]

    async def series_by_uid(self, series_uid: str) -> list[Series]:
        """The series with this UID (for manifests): asked of the main server, then NLST."""
        for host in self._servers:
            rows, gen, what = await self._rows(
                lambda g: api.series_by_uid_request(g, series_uid), host)
            found = [s for s in (api.parse_series(row, gen, "", what) for row in rows)
                     if s is not None and s.series_uid == series_uid]
            if found:
                self.remember_hosts([Collection(found[0].collection, host)])
                return found
        return []

    async def cart(self, name: str) -> list[Series]:
        """The series of a shared cart (getContentsByName, which only v1/v2 have)."""
        gen = self.gen if self.gen.name in ("v1", "v2", "legacy") else api_generation("v1")
        deadline = trio.current_time() + self.request_deadline

        def build(g: Generation) -> Request:
            return api.cart_request(g, name)

        reply, what, _used = await self._exchange(gen, build, MAIN, deadline, None)
        if reply.status != 200:
            raise self._status_error(reply, what, build(gen).endpoint, binary=False)
        rows = api.parse_rows(reply.body, what)
        found = [s for s in (api.parse_series(row, gen, "", what) for row in rows)
                 if s is not None]
        self.remember_hosts([Collection(s.collection, MAIN) for s in found])
        return found

    async def instance_uids(self, collection: str, series_uid: str) -> list[str]:
        host = await self._host_for(collection)
        rows, _gen, what = await self._rows(
            lambda g: api.instance_uids_request(g, series_uid), host)
        return api.parse_instance_uids(rows, what)

    async def series_size(self, collection: str, series_uid: str) -> tuple[int, int]:
        """(TotalSizeInBytes, ObjectCount); NotFound for a series the server does not know."""
        host = await self._host_for(collection)
        rows, _gen, what = await self._rows(
            lambda g: api.series_size_request(g, series_uid), host)
        size = api.parse_series_size(rows)
        if size is None:
            raise NotFound(f"{what}: no such series")
        return size

    async def instance_md5(self, collection: str, sop_uid: str, *, fresh: bool = False
                           ) -> str | None:
        """The MD5 the service keeps for one image (v1 getM5HashForImage, whatever the
        mount's generation: v4's is broken, see api.image_md5_request), asked of the
        collection's server. v1 answers as the guest, so None, its empty answer, comes for
        an image of a restricted collection as for one it does not know; and from a
        service that no longer has the endpoint. fresh asks past a site cache, as
        open_instance does."""
        if self._image_md5_gone:
            return None
        host = await self._host_for(collection)
        deadline = trio.current_time() + self.request_deadline
        v1 = api_generation("v1")

        def build(g: Generation) -> Request:
            return api.image_md5_request(g, sop_uid)

        # A 500 may be NBIA's way of saying "no such path" (docs/nbia-wire.md, "Errors
        # and status codes"): it is read before it is retried.
        for attempt in (1, 2):
            reply, what, _used = await self._exchange(
                v1, build, host, deadline, RETRY_STATUSES - {500}, fresh=fresh)
            if reply.status == 200:
                return api.parse_image_md5(reply.body, what)
            if api.is_missing_endpoint(reply.status, reply.body):
                self._image_md5_gone = True
                log.warning("%s: the service has no such endpoint (HTTP %d); single images "
                            "are kept unconfirmed until their series' MD5 list comes", what,
                            reply.status)
                return None
            if reply.status == 500 and attempt == 1:
                await trio.sleep(self._http.policy.backoff(1))
                continue
            raise self._status_error(reply, what, build(v1).endpoint, binary=False)
        raise AssertionError("unreachable")

    # -- downloads -----------------------------------------------------------------------

    @asynccontextmanager
    async def open_instance(self, collection: str, series_uid: str, sop_uid: str, *,
                            fresh: bool = False) -> AsyncIterator[SingleImageStream]:
        """One DICOM file (getSingleImage). Retries happen before the first byte only.
        fresh asks past a site cache (REFETCH_HEADER), replacing the copy it holds."""
        host = await self._host_for(collection)
        deadline = trio.current_time() + self.request_deadline

        def build(g: Generation) -> Request:
            return api.single_image_request(g, series_uid, sop_uid)

        # NBIA answers an unknown instance with a 500, so a 500 is not retried blindly:
        # it gets one more try, then counts as NotFound.
        for attempt in (1, 2):
            opened, what = await self._open(build, host, deadline,
                                            retry_on=RETRY_STATUSES - {500}, fresh=fresh)
            if opened.status == 200:
                break
            reply = await _error_reply(opened)
            if reply.status == 500 and attempt == 1:
                await trio.sleep(self._http.policy.backoff(1))
                continue
            raise self._status_error(reply, what, "getSingleImage", binary=True)
        try:
            yield SingleImageStream(opened, what)
        finally:
            await opened.aclose()

    @asynccontextmanager
    async def open_series(self, collection: str, series_uid: str, *, md5: bool = True,
                          hash_entries: bool = True, fresh: bool = False
                          ) -> AsyncIterator[SeriesZipStream]:
        """The whole-series ZIP, streamed; see SeriesZipStream. Retries before the first byte.

        md5 asks the service for its MD5 list; hash_entries=False leaves the entries'
        own MD5s to the caller (then `computed_md5s` stays empty); fresh asks past a site
        cache, as open_instance does.
        """
        host = await self._host_for(collection)
        deadline = trio.current_time() + self.request_deadline

        def build(g: Generation) -> Request:
            return api.series_zip_request(g, series_uid, md5)

        # A fresh borrower per stream: one task may hold several series open.
        borrower = object()
        with trio.move_on_at(deadline) as waited:
            await self._series_slots.acquire_on_behalf_of(borrower)
        if waited.cancelled_caught:  # trio acquires nothing when cancelled
            raise ServerError(f"series {series_uid}: no free download slot within "
                              f"{self.request_deadline:.0f} s (all held by open series)")
        try:
            opened, what = await self._open(build, host, deadline, fresh=fresh)
            if opened.status != 200:
                reply = await _error_reply(opened)
                raise self._status_error(reply, what, build(self.gen).endpoint, binary=True)
            try:
                yield SeriesZipStream(opened, what, hash_entries)
            finally:
                await opened.aclose()
        finally:
            self._series_slots.release_on_behalf_of(borrower)

    # -- request plumbing ----------------------------------------------------------------

    def _wants_token(self, gen: Generation) -> bool:
        return gen.bearer == "always" or (gen.bearer == "credentials"
                                          and self.credentials is not None)

    def _may_fall_back(self, status: int | None) -> bool:
        # Only public data may be asked of v1: with credentials a v1 answer could hide
        # restricted series and look like a confident empty listing.
        return (self.gen.fallback is not None and self.credentials is None
                and status is not None and (status == 404 or status >= 500))

    async def _rows(self, build: Builder, host: str
                    ) -> tuple[list[dict[str, Any]], Generation, str]:
        deadline = trio.current_time() + self.request_deadline
        rows, gen, what, used = await self._rows_once(build, host, deadline)
        if not rows and used is not None and self._empty_is_suspect(host, used):
            self.stats.empty_rechecks += 1
            log.info("%s: empty on a token %.0f s old; renewing it and asking again", what,
                     trio.current_time() - used.obtained_at)
            await self._tokens[host].invalidate_and_refresh(used.access)
            rows, gen, what, used = await self._rows_once(build, host, deadline)
        return rows, gen, what

    async def _rows_once(self, build: Builder, host: str, deadline: float
                         ) -> tuple[list[dict[str, Any]], Generation, str, Token | None]:
        reply, gen, what, used = await self._fetch(build, host, deadline)
        if reply.status == 200:
            return api.parse_rows(reply.body, what), gen, what, used
        if reply.status == 204:  # v1/v2 getSeriesMetaData's "nothing"
            return [], gen, what, used
        raise self._status_error(reply, what, build(gen).endpoint, binary=False)

    def _empty_is_suspect(self, host: str, used: Token) -> bool:
        manager = self._tokens.get(host)
        if manager is None:
            return False
        age = trio.current_time() - used.obtained_at
        return age > self.empty_recheck_age or not manager.is_fresh(used)

    async def _fetch(self, build: Builder, host: str, deadline: float
                     ) -> tuple[Reply, Generation, str, Token | None]:
        """A whole (listing) reply; 401 renews the token once; v2 falls back to v1."""
        try:
            reply, what, used = await self._exchange(self.gen, build, host, deadline, None)
        except ServerError as exc:
            if not self._may_fall_back(exc.status):
                raise
            gen = self._fallback(build, str(exc))
            reply, what, used = await self._exchange(gen, build, host, deadline, None)
            return reply, gen, what, used
        if reply.status == 404 and self._may_fall_back(404):
            gen = self._fallback(build, f"{what}: HTTP 404")
            reply, what, used = await self._exchange(gen, build, host, deadline, None)
            return reply, gen, what, used
        return reply, self.gen, what, used

    async def _open(self, build: Builder, host: str, deadline: float, *,
                    retry_on: frozenset[int] = RETRY_STATUSES, fresh: bool = False
                    ) -> tuple[OpenResponse, str]:
        """Like _fetch, but the body is left to the caller (who must aclose the result)."""
        try:
            opened, what, _used = await self._exchange(self.gen, build, host, deadline,
                                                       retry_on, stream=True, fresh=fresh)
        except ServerError as exc:
            if not self._may_fall_back(exc.status):
                raise
            gen = self._fallback(build, str(exc))
            opened, what, _used = await self._exchange(gen, build, host, deadline, retry_on,
                                                       stream=True, fresh=fresh)
            return opened, what
        if opened.status == 404 and self._may_fall_back(404):
            await opened.aclose()
            gen = self._fallback(build, f"{what}: HTTP 404")
            opened, what, _used = await self._exchange(gen, build, host, deadline, retry_on,
                                                       stream=True, fresh=fresh)
        return opened, what

    def _fallback(self, build: Builder, reason: str) -> Generation:
        gen = api.generation(self.gen.fallback or "v1")
        endpoint = build(self.gen).endpoint
        self.stats.fallbacks += 1
        if endpoint not in self._fallback_logged:
            self._fallback_logged.add(endpoint)
            log.warning("%s; asking %s instead (logged once per endpoint)", reason, gen.name)
        return gen

    async def _exchange(self, gen: Generation, build: Builder, host: str, deadline: float,
                        retry_on: frozenset[int] | None, *, stream: bool = False,
                        fresh: bool = False) -> tuple[Any, str, Token | None]:
        """One logical request on one generation: token, transport retries, 401 renewal."""
        request = build(gen)
        manager = self._tokens.get(host) if self._wants_token(gen) else None
        used: list[Token | None] = [None]

        async def headers() -> dict[str, str]:
            result = {"Accept-Encoding": "identity"} if request.binary else {}
            if fresh:
                result.update(REFETCH_HEADER)
            if gen.name == "legacy" and self._api_key:
                result["api_key"] = self._api_key
            if manager is not None:
                token = await manager.current()
                used[0] = token
                result["Authorization"] = f"Bearer {token.access}"
            return result

        what = f"{gen.name} {request.describe()} on {host}"
        call = Call("GET", self._servers[host] + gen.base_path(self._api_key) + request.endpoint,
                    what=what, endpoint=request.endpoint, params=request.params,
                    headers=headers, retry_on=retry_on if retry_on is not None else RETRY_STATUSES)
        for attempt in (1, 2):
            answer: Reply | OpenResponse
            if stream:
                answer = await self._http.open(call, deadline)
            else:
                answer = await self._http.fetch(call, deadline)
            if answer.status != 401:
                return answer, what, used[0]
            reply = await _error_reply(answer) if isinstance(answer, OpenResponse) else answer
            if manager is None or attempt == 2:
                detail = reply.text_line() or "unauthorised"
                self.stats.errors[request.endpoint] += 1
                raise AuthError(f"{what}: HTTP 401 ({detail})"
                                + (" even on a renewed token" if manager else ""))
            log.info("%s: HTTP 401; renewing the token and trying once more", what)
            token = used[0]
            await manager.invalidate_and_refresh(token.access if token else None)
        raise AssertionError("unreachable")

    def _status_error(self, reply: Reply, what: str, endpoint: str, *,
                      binary: bool) -> ClientError:
        self.stats.errors[endpoint] += 1
        line = reply.text_line()
        if reply.status in (400, 403) and api.is_not_authorised_text(line):
            return NotFound(f"{what}: {line}")
        if binary and reply.status == 404:
            return NotFound(f"{what}: HTTP 404 ({line or 'Not Found'})")
        if binary and reply.status == 500 and (not line or _SINGLE_IMAGE_NOT_FOUND
                                               in line.lower()):
            return NotFound(f"{what}: no such instance (HTTP 500: {line or 'no detail'})")
        if reply.status >= 500:
            return ServerError(f"{what}: HTTP {reply.status} ({line})", status=reply.status)
        return ClientError(f"{what}: HTTP {reply.status}" + (f" ({line})" if line else ""))


async def _error_reply(opened: OpenResponse) -> Reply:
    try:
        return await opened.read_error_body()
    finally:
        await opened.aclose()


# A request that must not be answered from a shared site cache, whose fresh answer
# replaces the cached one (docs/cluster.md; contrib/nginx/tciafs-site-cache.conf keys
# its proxy_cache_bypass on this header). Sent after a copy came damaged or short.
REFETCH_HEADER = {"X-Tciafs-Refetch": "1"}


def _same(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _root(url: str) -> str:
    """The server's root URL; it must be http(s)://host[:port], the client adds the paths."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid server URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid server URL {url!r}: expected http(s)://host[:port]")
    return url.rstrip("/")
