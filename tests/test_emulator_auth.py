"""Tokens, expiry, logout and restricted visibility (docs/nbia-wire.md, "Tokens and
OAuth" to "Visibility")."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_emulator_support import RESTRICTED, USERS, serve_tiny, uid

from tciafs.emulator.auth import UserDB
from tciafs.emulator.server import EmulatorServers

V1 = "/nbia-api/services/v1/"
V2 = "/nbia-api/services/v2/"
V4 = "/nbia-api/services/v4/"
ROOT = "/nbia-api/services/"
TOKEN = "/nbia-api/oauth/token"
LIFETIME = 1.0


@pytest.fixture(scope="module")
def servers() -> Iterator[EmulatorServers]:
    with serve_tiny(token_lifetime=LIFETIME, refresh_lifetime=30.0) as running:
        yield running


@pytest.fixture(scope="module")
def client(servers: EmulatorServers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=servers.url, timeout=10) as c:
        yield c


def grant(client: httpx.Client, username: str, password: str | None = None) -> dict:
    password = USERS[username].password if password is None else password
    r = client.post(TOKEN, data={"grant_type": "password", "username": username,
                                 "password": password, "client_id": "NBIA"})
    assert r.status_code == 200, r.text
    return r.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def collections(client: httpx.Client, headers: dict[str, str]) -> set[str]:
    r = client.get(V4 + "getCollectionValues", headers=headers)
    return {row["Collection"] for row in r.json()}


def test_password_grant_is_keycloak_shaped(client: httpx.Client) -> None:
    r = client.post(TOKEN, data={"grant_type": "password", "username": "alice",
                                 "password": USERS["alice"].password})
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["access_token", "expires_in", "refresh_expires_in", "refresh_token",
                          "token_type", "id_token", "not-before-policy", "session_state",
                          "scope"]
    assert body["token_type"] == "Bearer"
    assert (body["expires_in"], body["refresh_expires_in"], body["not-before-policy"]) == (1, 30, 0)
    payload = body["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["preferred_username"] == "alice" and claims["exp"] - claims["iat"] == 1


def test_guest_takes_any_password_and_the_services_alias(client: httpx.Client) -> None:
    for password in ("", "anything", "ItsBetweenUAndMe"):
        r = client.post("/nbia-api/services/oauth/token", data={
            "grant_type": "password", "username": "nbia_guest", "password": password})
        assert r.status_code == 200 and r.json()["access_token"]


def test_bad_credentials(client: httpx.Client) -> None:
    for username, password in (("alice", "wrong"), ("mallory", "x"), ("", "")):
        r = client.post(TOKEN, data={"grant_type": "password", "username": username,
                                     "password": password})
        assert r.status_code == 401
        assert r.json() == {"error": "invalid_grant",
                            "error_description": "Invalid user credentials"}
        assert "wrong" not in r.text
    assert client.post(TOKEN, data={"username": "alice"}).status_code == 500
    assert client.post(TOKEN, data={"grant_type": "client_credentials"}).status_code == 500
    assert client.get(TOKEN).status_code == 500


def test_refresh_grant(client: httpx.Client) -> None:
    first = grant(client, "alice")
    r = client.post(TOKEN, data={"grant_type": "refresh_token", "client_id": "nbia",
                                 "refresh_token": first["refresh_token"]})
    renewed = r.json()
    assert r.status_code == 200 and renewed["access_token"] != first["access_token"]
    assert RESTRICTED in collections(client, bearer(renewed["access_token"]))
    bad = client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": "nope"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"


def test_expired_token_behaviour(client: httpx.Client) -> None:
    token = grant(client, "alice")
    headers = bearer(token["access_token"])
    series = {"SeriesInstanceUID": uid("ct-f")}
    assert client.get(V4 + "getSeries", params=series, headers=headers).json()
    time.sleep(LIFETIME + 0.2)
    # Where NBIA resolves the user inside a try/catch, the 401 is swallowed: empty 200.
    for path, params in ((V4 + "getSeries", series), (V4 + "getPatient", {}),
                         (V4 + "getSOPInstanceUIDs", series), (V2 + "getPatientStudy", {})):
        r = client.get(path, params=params, headers=headers)
        assert (r.status_code, r.content) == (200, b""), path
    for path, params in ((V4 + "getImage", series), (V4 + "getCollectionValues", {}),
                         (V4 + "getModalityValuesAndCounts", {}),
                         (ROOT + "getBodyPartValuesAndCounts", {}),
                         (V4 + "getSingleImage", {**series, "SOPInstanceUID": uid("ct-f", 1)})):
        r = client.get(path, params=params, headers=headers)
        assert (r.status_code, r.content) == (401, b""), path
    tags = client.get(V4 + "getDicomTags", params={"SeriesUID": uid("ct-f")}, headers=headers)
    assert tags.status_code == 500
    # v1 never looks at the token.
    assert client.get(V1 + "getSeries", headers=headers).json()
    # A refresh after expiry still works (the refresh token lives longer).
    renewed = client.post(TOKEN, data={"grant_type": "refresh_token",
                                       "refresh_token": token["refresh_token"]}).json()
    assert client.get(V4 + "getSeries", params=series,
                      headers=bearer(renewed["access_token"])).json()


def test_strict_401_mode() -> None:
    with serve_tiny(token_lifetime=LIFETIME, expired_token_mode="401") as strict, \
            httpx.Client(base_url=strict.url, timeout=10) as c:
        r = c.get(V4 + "getSeries", headers=bearer("not-a-token"))
        assert (r.status_code, r.content) == (401, b"")
        assert c.get(V4 + "getSeries", headers={"Authorization": "Bearer undefined"}).json()


def test_logout_revokes_the_session(client: httpx.Client) -> None:
    for method in ("GET", "POST"):
        token = grant(client, "bob")
        headers = bearer(token["access_token"])
        assert RESTRICTED in collections(client, headers)
        r = client.request(method, "/nbia-api/logout", headers=headers)
        assert (r.status_code, r.text) == (200, "\n\tYou Have Logged Out successfully.")
        assert client.get(V4 + "getCollectionValues", headers=headers).status_code == 401
        refreshed = client.post(TOKEN, data={"grant_type": "refresh_token",
                                             "refresh_token": token["refresh_token"]})
        assert refreshed.status_code == 400
    assert client.post("/nbia-api/logout").status_code == 500


def test_v2_requires_a_bearer_v4_does_not(client: httpx.Client) -> None:
    series = {"SeriesInstanceUID": uid("ct-a")}
    missing = client.get(V2 + "getSeries")
    assert (missing.status_code, missing.content) == (200, b"")
    image = client.get(V2 + "getImage", params=series)
    assert image.status_code == 500 and image.headers["content-type"] == "text/plain"
    guest = bearer(grant(client, "nbia_guest", "")["access_token"])
    assert client.get(V2 + "getSeries", headers=guest).json()
    assert client.get(V2 + "getImage", params=series, headers=guest).status_code == 200
    undefined = {"Authorization": "Bearer undefined"}
    assert client.get(V2 + "getSeries", headers=undefined).json()
    assert client.get(V4 + "getSeries").json() == client.get(V4 + "getSeries",
                                                             headers=undefined).json()


def test_restricted_collections_need_a_grant(client: httpx.Client) -> None:
    guest = {"Authorization": "Bearer undefined"}
    assert RESTRICTED not in collections(client, guest)
    assert RESTRICTED in collections(client, bearer(grant(client, "alice")["access_token"]))
    assert RESTRICTED in collections(client, bearer(grant(client, "bob")["access_token"]))
    carol = bearer(grant(client, "carol")["access_token"])
    assert RESTRICTED not in collections(client, carol)
    series = {"SeriesInstanceUID": uid("ct-f")}
    for headers in (guest, carol):
        r = client.get(V4 + "getSeries", params=series, headers=headers)
        assert r.content == b""
        assert client.get(V4 + "getImage", params=series, headers=headers).status_code == 400
    # v4 getSOPInstanceUIDs does no authorisation at all (a production quirk); v1 does.
    assert len(client.get(V4 + "getSOPInstanceUIDs", params=series, headers=guest).json()) == 2
    assert client.get(V1 + "getSOPInstanceUIDs", params=series).content == b""


def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"dave": {"password": "pw", "collections": ["tiny-restricted"]},
                                "api_keys": ["k1"]}))
    users = UserDB.load(path, ("k2",))
    assert users.check_password("dave", "pw") and not users.check_password("dave", "PW")
    assert users.granted("dave", {RESTRICTED, "Other"}) == {RESTRICTED}
    assert users.api_keys == {"k1", "k2"}
    path.write_text(json.dumps({"eve": {"collections": []}}))
    with pytest.raises(ValueError, match="password"):
        UserDB.load(path)
