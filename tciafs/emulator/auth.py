"""Users, tokens and the OAuth endpoints (Keycloak era; docs/nbia-wire.md,
"Tokens and OAuth", "Expired tokens", "Logout").

* ``POST /nbia-api/oauth/token`` (and ``/nbia-api/services/oauth/token``), form fields
  ``grant_type`` = ``password`` (``username``, ``password``) or ``refresh_token``
  (``refresh_token``); ``client_id``/``client_secret``/``scope`` are accepted and
  ignored, as the NBIA proxy overrides them.  The answer is Keycloak's JSON with integer
  ``expires_in``, ``refresh_expires_in`` and ``not-before-policy``.  The tokens are
  JWT-shaped (HS256 with a per-process key) so that clients decoding them find
  ``exp``/``iat``/``preferred_username``; the server only trusts its own token store.
* ``nbia_guest`` is accepted with any password (the proxy substitutes the real one).
* Wrong credentials: 401 ``{"error":"invalid_grant","error_description":"Invalid user
  credentials"}``; a bad refresh token: 400 ``invalid_grant`` "Invalid refresh token"
  (both Keycloak's answers).  A missing ``grant_type`` is the proxy's NPE (500 text),
  another grant type its "Wrong grant_type entered..." error (500 text).
* A refresh grant returns a new access and a new refresh token of the same session; the
  old refresh token stays valid until it expires.  The refresh lifetime defaults to
  twice the access lifetime (``--refresh-lifetime``).
* ``/nbia-api/logout`` (GET and POST) revokes the whole session of the bearer token (or
  of a ``refresh_token`` form field) and answers 200 with the Spring-era text.  Without
  any token it answers the Keycloak-era ``Response.status(0, "No valid token.")``,
  which Jersey turns into a 500.

Users file (``--users-file``), JSON::

    {"alice": {"password": "...", "collections": ["Restricted-Collection"]},
     "bob":   {"password": "...", "collections": ["*"]},
     "api_keys": ["key-for-the-legacy-v3-api"]}

``"*"`` grants every restricted collection.  The top-level ``api_keys`` list (not a
user) holds the keys accepted by the legacy ``/services/v3/TCIA/query`` API.
Passwords and tokens are never logged or echoed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tciafs.emulator import wire

GUEST = "nbia_guest"
ALL_RESTRICTED = "*"
LOGOUT_TEXT = "\n\tYou Have Logged Out successfully."


@dataclass(frozen=True)
class User:
    name: str
    password: str
    collections: frozenset[str] = frozenset()


@dataclass
class UserDB:
    users: dict[str, User] = field(default_factory=dict)
    api_keys: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: Path | None, extra_api_keys: tuple[str, ...] = ()) -> UserDB:
        if path is None:
            return cls(api_keys=frozenset(extra_api_keys))
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the users file must hold a JSON object")
        keys = raw.pop("api_keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{path}: api_keys must be a list of strings")
        users = {name: _parse_user(path, name, entry) for name, entry in raw.items()}
        return cls(users, frozenset(keys) | frozenset(extra_api_keys))

    def check_password(self, username: str, password: str) -> bool:
        if username == GUEST:
            return True
        user = self.users.get(username)
        return user is not None and hmac.compare_digest(user.password.encode(),
                                                        password.encode())

    def granted(self, username: str | None, restricted: set[str]) -> set[str]:
        """The restricted collection names ``username`` may see."""
        user = self.users.get(username or "")
        if user is None or username == GUEST:
            return set()
        if ALL_RESTRICTED in user.collections:
            return set(restricted)
        wanted = {c.upper() for c in user.collections}
        return {c for c in restricted if c.upper() in wanted}


def _parse_user(path: Path, name: str, entry: object) -> User:
    if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
        raise ValueError(f"{path}: user {name!r} needs a string 'password'")
    collections = entry.get("collections", [])
    if not isinstance(collections, list) or not all(isinstance(c, str) for c in collections):
        raise ValueError(f"{path}: user {name!r}: 'collections' must be a list of names")
    return User(name, entry["password"], frozenset(collections))


@dataclass
class _Session:
    username: str
    session_id: str
    revoked: bool = False


@dataclass(frozen=True)
class _Grant:
    session: _Session
    expires: float  # time.monotonic() deadline


class TokenStore:
    """Issued tokens, shared by every server of the process."""

    def __init__(self, lifetime: float, refresh_lifetime: float | None = None,
                 issuer: str = "http://emulator/auth/realms/TCIA") -> None:
        self.lifetime = lifetime
        self.refresh_lifetime = refresh_lifetime if refresh_lifetime else 2 * lifetime
        self._issuer = issuer
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}

    def issue(self, username: str, session: _Session | None = None) -> dict[str, object]:
        session = session or _Session(username, str(uuid.uuid4()))
        now_wall, now = time.time(), time.monotonic()
        access = self._jwt(username, session.session_id, now_wall, self.lifetime, "Bearer")
        refresh = self._jwt(username, session.session_id, now_wall, self.refresh_lifetime,
                            "Refresh")
        id_token = self._jwt(username, session.session_id, now_wall, self.lifetime, "ID")
        with self._lock:
            self._purge(now)
            self._access[access] = _Grant(session, now + self.lifetime)
            self._refresh[refresh] = _Grant(session, now + self.refresh_lifetime)
        return {"access_token": access, "expires_in": int(self.lifetime),
                "refresh_expires_in": int(self.refresh_lifetime), "refresh_token": refresh,
                "token_type": "Bearer", "id_token": id_token, "not-before-policy": 0,
                "session_state": session.session_id, "scope": "openid profile email"}

    def user_of(self, access_token: str) -> str | None:
        """The user of a live access token; None if unknown, expired or revoked."""
        with self._lock:
            grant = self._access.get(access_token)
        if grant is None or grant.session.revoked or time.monotonic() >= grant.expires:
            return None
        return grant.session.username

    def refresh(self, refresh_token: str) -> dict[str, object] | None:
        with self._lock:
            grant = self._refresh.get(refresh_token)
        if grant is None or grant.session.revoked or time.monotonic() >= grant.expires:
            return None
        return self.issue(grant.session.username, grant.session)

    def revoke(self, token: str) -> bool:
        with self._lock:
            grant = self._access.get(token) or self._refresh.get(token)
            if grant is None:
                return False
            grant.session.revoked = True
            return True

    def _purge(self, now: float) -> None:
        # Keep the store bounded on long runs: forget grants well past their expiry.
        horizon = now - max(self.lifetime, self.refresh_lifetime)
        for table in (self._access, self._refresh):
            for token in [t for t, g in table.items() if g.expires < horizon]:
                del table[token]

    def _jwt(self, username: str, session_id: str, now: float, lifetime: float,
             typ: str) -> str:
        header = {"alg": "HS256", "typ": "JWT", "kid": "tciafs-emulator"}
        payload = {"exp": int(now + lifetime), "iat": int(now), "jti": str(uuid.uuid4()),
                   "iss": self._issuer, "aud": "account", "sub": f"f:emulator:{username}",
                   "typ": typ, "azp": "nbia", "session_state": session_id,
                   "scope": "openid profile email", "preferred_username": username}
        signing_input = _b64(json.dumps(header)) + "." + _b64(json.dumps(payload))
        signature = hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@dataclass(frozen=True)
class Identity:
    """Who the Authorization header says the caller is."""

    kind: Literal["guest", "user", "missing", "invalid"]
    username: str | None = None


GUEST_IDENTITY = Identity("guest", GUEST)


class Auth:
    def __init__(self, users: UserDB, tokens: TokenStore) -> None:
        self.users = users
        self.tokens = tokens

    def identify(self, authorization: str | None) -> Identity:
        if authorization is None:
            return Identity("missing")
        if authorization.strip().lower() == "bearer undefined":
            return GUEST_IDENTITY
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Identity("invalid")
        username = self.tokens.user_of(token.strip())
        if username is None:
            return Identity("invalid")
        return Identity("guest" if username == GUEST else "user", username)

    def token_endpoint(self, form: Mapping[str, str]) -> wire.Reply:
        grant = form.get("grant_type")
        if grant is None:
            return wire.server_error("java.lang.NullPointerException")
        if grant == "password":
            username, password = form.get("username", ""), form.get("password", "")
            if not username or not self.users.check_password(username, password):
                return _oauth_error(401, "invalid_grant", "Invalid user credentials")
            return _token_reply(self.tokens.issue(username))
        if grant == "refresh_token":
            issued = self.tokens.refresh(form.get("refresh_token", ""))
            if issued is None:
                return _oauth_error(400, "invalid_grant", "Invalid refresh token")
            return _token_reply(issued)
        return wire.server_error(
            "Wrong grant_type entered. Valid grant_type is password or refresh_token.")

    def logout(self, authorization: str | None, form: Mapping[str, str]) -> wire.Reply:
        token = form.get("refresh_token")
        if authorization and authorization.strip().lower() != "bearer undefined":
            scheme, _, bearer = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and bearer.strip():
                token = bearer.strip()
        if not token:
            return wire.server_error("No valid token.")
        self.tokens.revoke(token)
        return wire.text(200, LOGOUT_TEXT)

    def api_key_ok(self, key: str | None) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k.encode())
                                       for k in self.users.api_keys)


def _token_reply(payload: dict[str, object]) -> wire.Reply:
    reply = wire.jackson(payload)
    reply.headers += [("Cache-Control", "no-store"), ("Pragma", "no-cache")]
    return reply


def _oauth_error(status: int, error: str, description: str) -> wire.Reply:
    reply = wire.jackson({"error": error, "error_description": description})
    reply.status = status
    return reply
