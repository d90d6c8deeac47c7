"""The real NbiaClient facing hostile or broken replies from a scripted loopback server.

Each test writes the server's replies (tests/scripted_server.py); they reach the client
over real HTTP, through its transport, retry loop, token handling and parsers.
"""

from __future__ import annotations

import io
import logging
import socket
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from tciafs.sources.base import (
    AuthError,
    ClientError,
    MalformedResponse,
    NotFound,
    ServerError,
    TruncatedStream,
)
from tciafs.sources.nbia import Credentials, NbiaClient

from scripted_server import Handler, ScriptedServer

pytestmark = pytest.mark.handler

ROOT = "http://nbia.test"  # for the tests that send no request
SERIES_ROW = {"SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2", "PatientID": "P1",
              "Collection": "C", "ImageCount": 1}
PASSWORD = "s3cret-Pa55word"

@asynccontextmanager
async def make_client(handler: Handler, **kwargs: object) -> AsyncIterator[NbiaClient]:
    options: dict[str, object] = {"nlst_server": None, "backoff_base": 0.01, "retries": 3,
                                  "request_deadline": 10.0}
    options.update(kwargs)
    with ScriptedServer(handler) as url:
        async with NbiaClient(url, **options) as client:  # type: ignore[arg-type]
            yield client


def json_reply(rows: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=rows)


def token_reply(access: str, expires_in: int = 3600) -> httpx.Response:
    return json_reply({"access_token": access, "refresh_token": f"refresh-{access}",
                       "expires_in": expires_in, "refresh_expires_in": 2 * expires_in,
                       "token_type": "Bearer"})


def series_zip(md5: bool = True) -> bytes:
    class Sink(io.RawIOBase):
        data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # noqa: ANN001
            self.data += b
            return len(b)

    sink = Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("00000001.dcm", "w") as f:
            f.write(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40)
        if md5:
            with zf.open("md5hashes.csv", "w") as f:
                f.write(b"Filename,MD5Hash\n00000001.dcm,00000000000000000000000000000000\n")
    return bytes(sink.data)


@pytest.mark.parametrize("reply, message", [
    (httpx.Response(200, html="<html><body><h1>Maintenance</h1></body></html>"), "got HTML"),
    (httpx.Response(200, json={"resultSet": []}), "got dict"),
    (httpx.Response(200, json=["C1", "C2"]), "found a str"),
    (httpx.Response(200, text="Server was not able to process your request"), "expected JSON"),
    (httpx.Response(200, json=[{"SeriesInstanceUID": {"x": 1}, "StudyInstanceUID": "1",
                                "PatientID": "P"}]), "SeriesInstanceUID is a dict"),
])
async def test_malformed_listing_bodies(reply: httpx.Response, message: str) -> None:
    async with make_client(lambda request: reply) as client:
        with pytest.raises(MalformedResponse, match=message) as info:
            await client.series("C")
    assert "getSeries(Collection='C')" in str(info.value)


async def test_empty_and_no_content_are_empty_lists() -> None:
    replies = iter([httpx.Response(200), httpx.Response(204),
                    httpx.Response(200, json=[{}, {}])])
    async with make_client(lambda request: next(replies)) as client:
        assert await client.series("C") == []
        assert await client.patients("C") == []
        assert await client.collections() == []


async def test_client_side_filtering_of_unfiltered_answers() -> None:
    # v1/v2 ignore a misspelt parameter and answer every series; the client filters again.
    rows = [SERIES_ROW, {**SERIES_ROW, "SeriesInstanceUID": "9", "PatientID": "P2"},
            {**SERIES_ROW, "SeriesInstanceUID": "8", "Collection": "Other"}]
    async with make_client(lambda request: json_reply(rows), api="v1") as client:
        found = await client.series("c", patient_id="p1")
    assert [s.series_uid for s in found] == ["1.2.3"]


async def test_retry_after_is_honoured() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "1"})
        return json_reply([SERIES_ROW])

    async with make_client(handler) as client:
        assert [s.series_uid for s in await client.series("C")] == ["1.2.3"]
        assert client.stats.retries == 1
    assert calls[1] - calls[0] >= 1.0


async def test_retry_after_past_the_deadline_gives_up_at_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "120"})

    async with make_client(handler, request_deadline=5.0) as client:
        with trio.fail_after(2):
            with pytest.raises(ServerError, match="Retry-After 120 s") as info:
                await client.collections()
    assert info.value.status == 429


async def test_persistent_503_raises_after_the_retries() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        return httpx.Response(503, text="Service Unavailable")

    async with make_client(handler, retries=4) as client:
        with pytest.raises(ServerError, match=r"HTTP 503 .*gave up after 5 attempts") as info:
            await client.series("C")
        assert client.stats.retries == 4
        assert client.stats.errors["getSeries"] == 1
    assert info.value.status == 503 and len(attempts) == 5


async def test_connections_dropped_before_a_reply_are_retried() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError  # the server resets the connection instead
        return json_reply([{"Collection": "C"}])

    async with make_client(handler) as client:
        assert [c.name for c in await client.collections()] == ["C"]
    assert len(attempts) == 3


async def test_a_refused_connection_is_retried_then_reported() -> None:
    with socket.socket() as sock:  # a port that nothing listens on, once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with NbiaClient(f"http://127.0.0.1:{port}", nlst_server=None, backoff_base=0.01,
                          retries=2) as client:
        with pytest.raises(ServerError, match=r"getCollectionValues.*ConnectError"):
            await client.collections()
        assert client.stats.retries == 2


async def test_a_listing_body_cut_short_is_fetched_again() -> None:
    attempts = []

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):  # noqa: ANN204
            yield b'[{"Collection": "C'
            raise httpx.ReadError("Connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(200, stream=Broken())
        return json_reply([{"Collection": "C"}])

    async with make_client(handler) as client:
        assert [c.name for c in await client.collections()] == ["C"]
    assert len(attempts) == 2


async def test_the_overall_deadline_bounds_a_hung_server() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(30)
        return json_reply([])

    async with make_client(handler, request_deadline=1.0) as client:
        start = trio.current_time()
        with pytest.raises(ServerError, match="deadline"):
            await client.series("C")
        assert trio.current_time() - start < 3.0


async def test_single_image_500_means_not_found_after_one_more_try() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.params["SOPInstanceUID"])
        return httpx.Response(500, text="Server was not able to process your request\n"
                                        "java.lang.NullPointerException")

    async with make_client(handler) as client:
        with pytest.raises(NotFound, match="getSingleImage"):
            async with client.open_instance("C", "1.2.3", "1.2.3.4"):
                pass
    assert attempts == ["1.2.3.4", "1.2.3.4"]


async def test_single_image_shorter_than_content_length() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "1000",
                                            "Content-Type": "application/dicom"},
                              content=b"x" * 600)

    async with make_client(handler) as client, \
            client.open_instance("C", "1.2.3", "1.2.3.4") as stream:
        assert stream.size == 1000
        with pytest.raises(TruncatedStream, match="600 of 1000 bytes"):
            await stream.read()


async def test_unauthorised_series_is_not_found() -> None:
    text = ("The user has not been granted the access to image with given "
            "SeriesInstanceUID,1.2.3. Please contact System Admin to resolve this issue.")

    async with make_client(lambda request: httpx.Response(400, text=text)) as client:
        with pytest.raises(NotFound, match="not been granted"):
            async with client.open_series("C", "1.2.3"):
                pass


async def test_truncated_series_zip_and_md5_mismatch() -> None:
    whole = series_zip()
    bodies = iter([whole[:len(whole) - 30], whole])
    async with make_client(lambda request: httpx.Response(200, content=next(bodies))) as client:
        async with client.open_series("C", "1.2.3") as stream:
            with pytest.raises(TruncatedStream):
                async for member in stream.members():
                    await member.skip()
        async with client.open_series("C", "1.2.3") as stream:
            names = [member.name async for member in stream.members()]
            assert names == ["00000001.dcm"]
            assert stream.md5s == {"00000001.dcm": "0" * 32}
            assert stream.md5_mismatches() == ["00000001.dcm"]


async def test_html_instead_of_a_zip() -> None:
    page = "<html><body>Bad Gateway</body></html>"
    async with make_client(lambda request: httpx.Response(200, html=page)) as client, \
            client.open_series("C", "1.2.3") as stream:
        with pytest.raises(MalformedResponse, match="not a ZIP"):
            async for _member in stream.members():
                pass


async def test_v2_falls_back_to_v1_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/nbia-api/oauth/token":
            return token_reply("guest-token")
        if request.url.path == "/nbia-api/logout":
            return httpx.Response(200)
        if "/v2/" in request.url.path:
            return httpx.Response(404)
        assert "authorization" not in request.headers  # v1 never gets a token
        return json_reply([SERIES_ROW])

    caplog.set_level(logging.WARNING, logger="tciafs.client")
    async with make_client(handler, api="v2") as client:
        assert len(await client.series("C")) == 1
        assert len(await client.series("C")) == 1
        assert client.stats.fallbacks == 2
    assert "/nbia-api/services/v1/getSeries" in seen
    assert sum("asking v1 instead" in r.getMessage() for r in caplog.records) == 1


async def test_v2_with_credentials_does_not_fall_back() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            return token_reply("alice-token")
        return httpx.Response(503)

    async with make_client(handler, api="v2", retries=1,
                           credentials=Credentials("alice", PASSWORD)) as client:
        with pytest.raises(ServerError):
            await client.series("C")
        assert client.stats.fallbacks == 0


async def test_401_renews_the_token_once(caplog: pytest.LogCaptureFixture) -> None:
    grants, bearers = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            form = dict(httpx.QueryParams(request.content.decode()))
            grants.append(form["grant_type"])
            return token_reply(f"token-{len(grants)}")
        if request.url.path == "/nbia-api/logout":
            return httpx.Response(200)
        bearers.append(request.headers.get("authorization"))
        if request.headers.get("authorization") == "Bearer token-1":
            return httpx.Response(401)
        return json_reply([SERIES_ROW])

    caplog.set_level(logging.DEBUG)
    async with make_client(handler, credentials=Credentials("alice", PASSWORD)) as client:
        assert len(await client.series("C")) == 1
        assert client.stats.token_refreshes == 1
    assert grants == ["password", "refresh_token"]
    assert bearers == ["Bearer token-1", "Bearer token-2"]
    assert PASSWORD not in caplog.text and "token-1" not in caplog.text


async def test_a_refused_refresh_falls_back_to_the_password_grant() -> None:
    grants = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            form = dict(httpx.QueryParams(request.content.decode()))
            grants.append(form["grant_type"])
            if form["grant_type"] == "refresh_token":
                return json_reply({"error": "invalid_grant"}, status=400)
            return token_reply(f"token-{len(grants)}")
        if request.headers.get("authorization") == "Bearer token-1":
            return httpx.Response(401)
        return json_reply([SERIES_ROW])

    async with make_client(handler, credentials=Credentials("alice", PASSWORD)) as client:
        assert len(await client.series("C")) == 1
    assert grants == ["password", "refresh_token", "password"]


async def test_persistent_401_is_an_auth_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            return token_reply("whatever")
        return httpx.Response(401)

    async with make_client(handler, credentials=Credentials("alice", PASSWORD)) as client:
        with pytest.raises(AuthError, match="even on a renewed token"):
            await client.collections()


async def test_empty_listing_on_an_old_token_is_asked_again() -> None:
    grants: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            grants.append("grant")
            return token_reply(f"token-{len(grants)}")
        # The real service's expired-token answer: 200 with an empty body.
        if request.headers.get("authorization") == "Bearer token-1":
            return httpx.Response(200)
        return json_reply([SERIES_ROW])

    credentials = Credentials("alice", PASSWORD)
    async with make_client(handler, credentials=credentials, empty_recheck_age=0.2) as client:
        await client.ensure_fresh_token()
        await trio.sleep(0.3)  # token-1 is now "old"
        assert len(await client.series("C")) == 1
        assert client.stats.empty_rechecks == 1
    assert len(grants) == 2


async def test_empty_listing_on_a_fresh_token_is_trusted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nbia-api/oauth/token":
            return token_reply("token")
        return httpx.Response(200)

    credentials = Credentials("alice", PASSWORD)
    async with make_client(handler, credentials=credentials, empty_recheck_age=60) as client:
        assert await client.series("C") == []
        assert client.stats.empty_rechecks == 0
        assert not client.token_may_be_stale()


async def test_wrong_password_message(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return json_reply({"error": "invalid_grant",
                           "error_description": "Invalid user credentials"}, status=401)

    caplog.set_level(logging.DEBUG)
    async with make_client(handler, credentials=Credentials("alice", PASSWORD)) as client:
        with pytest.raises(AuthError) as info:
            await client.start()
    assert str(info.value) == "login failed for user 'alice': invalid credentials"
    assert PASSWORD not in caplog.text


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials("alice", PASSWORD)
    client = NbiaClient(ROOT, credentials=credentials, nlst_server=None)
    for text in (repr(credentials), str(credentials), repr(client), repr(client.tokens)):
        assert PASSWORD not in text
    assert "alice" in repr(credentials)
    assert credentials.password == PASSWORD


def test_bad_configuration_fails_early() -> None:
    with pytest.raises(ValueError, match="unknown API generation 'v3'"):
        NbiaClient(ROOT, api="v3")
    with pytest.raises(ValueError, match="invalid server URL"):
        NbiaClient("services.cancerimagingarchive.net")
    with pytest.raises(ValueError, match="invalid server URL"):
        NbiaClient(ROOT, nlst_server="ftp://nlst.example")


async def test_legacy_v3_sends_the_key_in_a_header_only() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, dict(request.url.params), request.headers.get("api_key")))
        if request.headers.get("api_key") != "the-key":
            return httpx.Response(401, text="Invalid or missing api_key")
        return json_reply([{"Collection": "C"}])

    async with make_client(handler, api="legacy", api_key="the-key") as client:
        assert [c.name for c in await client.collections()] == ["C"]
    assert seen == [("/services/v3/TCIA/query/getCollectionValues", {"format": "json"},
                     "the-key")]
    async with make_client(handler, api="legacy", api_key="wrong") as client:
        with pytest.raises(AuthError, match="Invalid or missing api_key") as info:
            await client.collections()
    assert "wrong" not in str(info.value)


async def test_a_rejected_parameter_is_a_client_error() -> None:
    text = "Invalid query parameter: 'collection'. Allowed parameters are: [Collection]"
    async with make_client(lambda request: httpx.Response(400, text=text)) as client:
        with pytest.raises(ClientError, match="HTTP 400 .*Invalid query parameter") as info:
            await client.series("C")
    assert not isinstance(info.value, NotFound | ServerError)


async def test_unknown_series_size_is_not_found() -> None:
    # v4 answers an unknown UID with an empty body, v1 with one row of NULLs.
    replies = iter([httpx.Response(200), httpx.Response(200, json=[{}]),
                    json_reply([{"TotalSizeInBytes": 1234, "ObjectCount": 2}])])
    async with make_client(lambda request: next(replies)) as client:
        for _ in range(2):
            with pytest.raises(NotFound, match="getSeriesSize"):
                await client.series_size("C", "1.2.3")
        assert await client.series_size("C", "1.2.3") == (1234, 2)


async def test_concurrency_stays_within_the_budget() -> None:
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(0.05)
        in_flight -= 1
        return json_reply([SERIES_ROW])

    async with make_client(handler, max_connections=4) as client, \
            trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(client.series, "C")
    assert peak == 4


async def test_open_series_streams_are_bounded_and_time_out() -> None:
    body = series_zip()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/getImage"):
            return httpx.Response(200, content=body)
        return json_reply([SERIES_ROW])

    async with make_client(handler, max_connections=3, request_deadline=0.5) as client:
        async with client.open_series("C", "1.2.3"):  # the only series slot of 3 - 2
            with pytest.raises(ServerError, match="no free download slot"):
                async with client.open_series("C", "4.5.6"):
                    pass
            # Listings and single images still have their own slots.
            assert len(await client.series("C")) == 1
        async with client.open_series("C", "4.5.6") as stream:
            assert [m.name async for m in stream.members()] == ["00000001.dcm"]


async def test_fresh_downloads_ask_past_a_site_cache_and_others_do_not() -> None:
    """fresh=True puts the refetch header on image requests (on every attempt, the
    retries included), so that a site cache replaces its copy; nothing else carries it."""
    seen: list[tuple[str, str | None]] = []
    retried = set()

    def handler(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.rsplit("/", 1)[-1]
        seen.append((endpoint, request.headers.get("X-Tciafs-Refetch")))
        if endpoint == "getSingleImage" and endpoint not in retried:
            retried.add(endpoint)
            return httpx.Response(503, text="busy")
        if endpoint == "getSingleImage":
            return httpx.Response(200, content=b"DICM", headers={"Content-Length": "4"})
        if endpoint == "getImage":
            return httpx.Response(200, content=series_zip())
        return json_reply([SERIES_ROW])

    async with make_client(handler) as client:
        await client.series("C")
        for fresh in (False, True):
            async with client.open_instance("C", "1.2.3", "1.2.3.4", fresh=fresh) as s:
                await s.read()
            async with client.open_series("C", "1.2.3", fresh=fresh) as z:
                async for member in z.members():
                    async for _ in member.chunks():
                        pass
            retried.clear()
    assert seen == [("getSeries", None),
                    ("getSingleImage", None), ("getSingleImage", None), ("getImage", None),
                    ("getSingleImage", "1"), ("getSingleImage", "1"), ("getImage", "1")]


# -- one image's MD5 ------------------------------------------------------------------------


async def test_an_image_md5_is_asked_of_v1_as_the_guest_whatever_the_generation() -> None:
    seen: list[tuple[str, dict[str, str], str | None, str | None]] = []
    md5 = "0123456789abcdef" * 2
    answers = iter([httpx.Response(200, text=md5.upper() + "\n"), httpx.Response(200),
                    httpx.Response(200, text=md5)])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("oauth/token"):
            return token_reply("guest-token")
        seen.append((request.url.path, dict(request.url.params),
                     request.headers.get("Authorization"),
                     request.headers.get("X-Tciafs-Refetch")))
        return next(answers)

    async with make_client(handler, api="v2") as client:  # v2 sends a token everywhere else
        assert await client.instance_md5("C", "1.2.3.4") == md5
        assert await client.instance_md5("C", "1.2.3.5") is None  # restricted, or unknown
        assert await client.instance_md5("C", "1.2.3.4", fresh=True)
    path = "/nbia-api/services/v1/getM5HashForImage"
    assert seen == [(path, {"SOPInstanceUid": "1.2.3.4"}, None, None),
                    (path, {"SOPInstanceUid": "1.2.3.5"}, None, None),
                    (path, {"SOPInstanceUid": "1.2.3.4"}, None, "1")]


@pytest.mark.parametrize("reply", [
    httpx.Response(200, html="<html><body>Maintenance</body></html>"),
    httpx.Response(200, text="d41d8cd98f00b204e9800998ecf8427"),  # 31 digits
    httpx.Response(200, json=[{"md5": "d41d8cd98f00b204e9800998ecf8427e"}]),
])
async def test_an_image_md5_that_is_not_one_is_malformed(reply: httpx.Response) -> None:
    async with make_client(lambda request: reply) as client:
        with pytest.raises(MalformedResponse, match="getM5HashForImage"):
            await client.instance_md5("C", "1.2.3.4")


@pytest.mark.parametrize("reply", [
    httpx.Response(404, text="Not Found"),
    httpx.Response(500, text="Server was not able to process your request\nHTTP 404 Not Found"),
])
async def test_a_service_without_the_image_md5_endpoint_is_asked_once(
        reply: httpx.Response, caplog: pytest.LogCaptureFixture) -> None:
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return reply

    async with make_client(handler) as client:
        assert await client.instance_md5("C", "1.2.3.4") is None
        assert await client.instance_md5("C", "1.2.3.5") is None
    assert len(asked) == 1
    assert "no such endpoint" in caplog.text


async def test_an_image_md5_that_keeps_failing_is_a_server_error() -> None:
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(500, text="Server was not able to process your request\nboom")

    async with make_client(handler) as client:
        with pytest.raises(ServerError, match="HTTP 500"):
            await client.instance_md5("C", "1.2.3.4")
    assert len(asked) == 2  # a 500 is read, then tried once more
