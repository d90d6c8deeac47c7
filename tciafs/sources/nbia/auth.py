"""Credentials and OAuth tokens for the NBIA token endpoint.

One TokenManager per server holds one access token. It is fetched with the password
grant, renewed with the refresh_token grant (falling back to a new password grant when
that fails) before it expires, with a safety margin scaled to the token's lifetime so a
2-hour token is renewed 5 minutes early and a 2-second test token half a second early.
A trio.Lock with a double check makes concurrent callers share one renewal.

Secrets: the password only ever goes into the token request's form body, which the
transport never logs; repr/str of Credentials hide it; errors name the user only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import trio

from tciafs.sources.base import AuthError, ClientError, MalformedResponse

from .http import Call, HeaderSource, Reply, Transport

log = logging.getLogger("tciafs.client")

GUEST_USER = "nbia_guest"
CLIENT_ID = "NBIA"
_DEFAULT_LIFETIME = 600.0  # when a token answer gives no expires_in: assume short
_TOKEN_DEADLINE = 60.0
_LOGOUT_DEADLINE = 10.0


class Credentials:
    """A user name and password; the password never shows in repr, str or pickles' logs."""

    __slots__ = ("username", "_password")

    def __init__(self, username: str, password: str) -> None:
        if not username:
            raise ValueError("a user name is required")
        self.username = username
        self._password = password

    @classmethod
    def guest(cls) -> Credentials:
        # The Keycloak-era proxy substitutes the guest's real password; Spring took "".
        return cls(GUEST_USER, "")

    @property
    def password(self) -> str:
        return self._password

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self.username, self._password) == (other.username, other._password)

    def __hash__(self) -> int:
        return hash(self.username)


@dataclass(frozen=True)
class Token:
    access: str
    refresh: str | None
    obtained_at: float  # trio clock
    expires_at: float
    refresh_expires_at: float | None

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def __repr__(self) -> str:
        return f"Token(expires_at={self.expires_at:.1f}, refresh={self.refresh is not None})"


class TokenManager:
    def __init__(self, transport: Transport, server: str, credentials: Credentials, *,
                 margin: float = 300.0, client_id: str = CLIENT_ID, label: str = "main") -> None:
        self._transport = transport
        self._server = server.rstrip("/")
        self.credentials = credentials
        self.margin = margin
        self._client_id = client_id
        self.label = label
        self._token: Token | None = None
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self.last_error: str | None = None

    @classmethod
    def guest(cls, transport: Transport, server: str, **kwargs: object) -> TokenManager:
        return cls(transport, server, Credentials.guest(), **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"TokenManager(server={self._server!r}, user={self.credentials.username!r}, "
                f"token={self._token!r})")

    # -- state ---------------------------------------------------------------------------

    @property
    def token(self) -> Token | None:
        return self._token

    def margin_for(self, token: Token) -> float:
        return min(self.margin, token.lifetime * 0.25)

    def renew_at(self, token: Token) -> float:
        return token.expires_at - self.margin_for(token)

    def is_fresh(self, token: Token | None) -> bool:
        return token is not None and trio.current_time() < self.renew_at(token)

    def is_stale(self) -> bool:
        """A token is held but due for renewal (or past expiry), or the last renewal failed."""
        token = self._token
        return (token is not None and not self.is_fresh(token)) or self.last_error is not None

    # -- getting a token -----------------------------------------------------------------

    async def current(self) -> Token:
        """A token good for at least the safety margin, renewing it if need be."""
        token = self._token
        if self.is_fresh(token):
            assert token is not None
            return token
        async with self._lock:
            token = self._token  # another task may have renewed it while we waited
            if self.is_fresh(token):
                assert token is not None
                return token
            return await self._renew(token)

    async def access_token(self) -> str:
        return (await self.current()).access

    async def ensure_fresh(self) -> None:
        await self.current()

    async def invalidate_and_refresh(self, used: str | None = None) -> Token:
        """The server refused `used`: renew now, unless another task already did."""
        async with self._lock:
            token = self._token
            if token is not None and used is not None and token.access != used:
                return token
            return await self._renew(token)

    async def login(self) -> Token:
        async with self._lock:
            return await self._renew(None)

    async def _renew(self, old: Token | None) -> Token:
        try:
            token = None
            if old is not None and old.refresh and (
                    old.refresh_expires_at is None
                    or trio.current_time() < old.refresh_expires_at - 1.0):
                try:
                    token = await self._grant({"grant_type": "refresh_token",
                                               "refresh_token": old.refresh}, "refresh")
                except ClientError as exc:
                    log.info("token refresh for %r on %s failed (%s); logging in again",
                             self.credentials.username, self.label, exc)
            if token is None:
                token = await self._grant({"grant_type": "password",
                                           "username": self.credentials.username,
                                           "password": self.credentials.password}, "password")
        except ClientError as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        if old is not None:
            self._transport.stats.token_refreshes += 1
        self._set(token)
        return token

    def _set(self, token: Token | None) -> None:
        self._token = token
        self._changed.set()
        self._changed = trio.Event()

    async def _grant(self, form: dict[str, str], kind: str) -> Token:
        user = self.credentials.username
        call = Call("POST", f"{self._server}/nbia-api/oauth/token",
                    what=f"token request ({kind} grant for user {user!r} on {self.label})",
                    endpoint="oauth/token", form={**form, "client_id": self._client_id},
                    limited=False)
        sent_at = trio.current_time()
        reply = await self._transport.fetch(call, sent_at + _TOKEN_DEADLINE)
        if reply.status in (400, 401, 403):
            if kind == "password":
                raise AuthError(f"login failed for user {user!r}: invalid credentials")
            raise AuthError(f"token refresh refused for user {user!r} (HTTP {reply.status})")
        if reply.status != 200:
            raise AuthError(f"login failed for user {user!r}: token endpoint answered "
                            f"HTTP {reply.status}")
        return _parse_token(reply, sent_at, call.what)

    # -- background renewal and logout ---------------------------------------------------

    async def run_refresher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Renew the token before it expires, forever; for the CLI's nursery.

        It never logs in by itself: until someone asks for a token it just waits.
        """
        task_status.started()
        failures = 0
        while True:
            token, changed = self._token, self._changed
            if token is None:
                await changed.wait()
                continue
            with trio.move_on_at(self.renew_at(token)):
                await changed.wait()
                continue  # someone else replaced the token: recompute the wake-up time
            try:
                await self.current()
                failures = 0
            except ClientError as exc:
                failures += 1
                pause = min(60.0, max(1.0, self.margin_for(token)) * failures)
                log.warning("background token renewal for %r on %s failed (%s); "
                            "trying again in %.0f s", self.credentials.username, self.label,
                            exc, pause)
                await trio.sleep(pause)

    async def logout(self) -> None:
        """Revoke the token on the server; errors are logged, never raised."""
        token = self._token
        self._set(None)
        if token is None:
            return
        call = Call("POST", f"{self._server}/nbia-api/logout",
                    what=f"logout of user {self.credentials.username!r} on {self.label}",
                    endpoint="logout", limited=False, retry_on=frozenset(),
                    headers=_bearer(token.access))
        try:
            with trio.CancelScope(shield=True):
                reply = await self._transport.fetch(call, trio.current_time() + _LOGOUT_DEADLINE)
            if reply.status != 200:
                log.info("%s: HTTP %d (ignored)", call.what, reply.status)
        except ClientError as exc:
            log.info("%s failed (ignored): %s", call.what, exc)


def _bearer(access: str) -> HeaderSource:
    async def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {access}"}
    return headers


def _parse_token(reply: Reply, sent_at: float, what: str) -> Token:
    try:
        data = json.loads(reply.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedResponse(f"{what}: the token endpoint did not answer JSON") from None
    access = data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(access, str) or not access:
        raise MalformedResponse(f"{what}: no access_token in the answer")
    refresh = data.get("refresh_token")
    # Lifetimes count from when we asked, not when we heard back: the server's clock
    # started first, so this errs towards renewing early.
    lifetime = _seconds(data.get("expires_in")) or _DEFAULT_LIFETIME
    refresh_lifetime = _seconds(data.get("refresh_expires_in"))
    return Token(access=access, refresh=refresh if isinstance(refresh, str) and refresh else None,
                 obtained_at=sent_at, expires_at=sent_at + lifetime,
                 refresh_expires_at=sent_at + refresh_lifetime if refresh_lifetime else None)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None
