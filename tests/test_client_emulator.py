"""NbiaClient against the real emulator (a subprocess on loopback), for every generation.

The shared session emulator is used for listings, bytes and faults (faults are cleared
after each test that sets them); tests of tokens and restricted data start their own
emulator with a 2-second token lifetime and a users file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tciafs.sources.base import AuthError, NotFound, Series, ServerError, TruncatedStream
from tciafs.sources.nbia import Credentials, NbiaClient

from conftest import EmulatorProcess, start_emulator

pytestmark = pytest.mark.handler

GENERATIONS = ["v4", "v2", "v1", "legacy"]
PASSWORD = "correct horse battery staple"
API_KEY = "legacy-v3-key"


def client_for(emu: EmulatorProcess, api: str = "v4", **kwargs: object) -> NbiaClient:
    options: dict[str, object] = {"api": api, "nlst_server": emu.nlst_url,
                                  "backoff_base": 0.05, "request_deadline": 30.0}
    options.update(kwargs)
    return NbiaClient(emu.url, **options)  # type: ignore[arg-type]


def set_faults(emu: EmulatorProcess, faults: dict[str, object]) -> None:
    for url in (emu.url, emu.nlst_url):
        reply = httpx.post(f"{url}/_emulator/faults", json=faults, timeout=10)
        reply.raise_for_status()


@pytest.fixture
def faults(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The session emulator, with every fault cleared afterwards (it is shared)."""
    try:
        yield emulator
    finally:
        set_faults(emulator, {})


def raw_collections(url: str) -> set[str]:
    reply = httpx.get(f"{url}/nbia-api/services/v1/getCollectionValues", timeout=10)
    return {row["Collection"] for row in reply.json()}


async def snapshot(client: NbiaClient) -> dict[str, object]:
    """Everything a tree would show, as comparable values."""
    tree: dict[str, object] = {}
    for collection in await client.collections():
        patients = await client.patients(collection.name)
        studies = await client.studies(collection.name)
        series = await client.series(collection.name)
        tree[collection.name] = {
            "host": collection.host,
            "patients": sorted(p.patient_id for p in patients),
            "studies": sorted((s.patient_id, s.study_uid, s.series_count) for s in studies),
            "series": sorted((s.patient_id, s.study_uid, s.series_uid, s.modality,
                              s.image_count, s.series_number, s.body_part) for s in series),
        }
    return tree


@pytest.mark.timeout(60)
async def test_every_generation_lists_the_same_tree(emulator: EmulatorProcess) -> None:
    trees = {}
    for api in GENERATIONS:
        async with client_for(emulator, api) as client:
            await client.start()
            trees[api] = await snapshot(client)
    v4 = trees["v4"]
    for api in GENERATIONS[1:]:
        assert trees[api] == v4, f"{api} differs from v4"
    hosts = {name: entry["host"] for name, entry in v4.items()}  # type: ignore[index]
    assert {n for n, h in hosts.items() if h == "main"} == raw_collections(emulator.url)
    assert emulator.nlst_url is not None
    assert {n for n, h in hosts.items() if h == "nlst"} == raw_collections(emulator.nlst_url)
    assert "nlst" in hosts.values()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", GENERATIONS)
async def test_listings_are_consistent(emulator: EmulatorProcess, api: str) -> None:
    async with client_for(emulator, api) as client:
        for collection in await client.collections():
            patients = {p.patient_id for p in await client.patients(collection.name)}
            studies = await client.studies(collection.name)
            series = await client.series(collection.name)
            assert patients and studies and series
            per_study = Counter(s.study_uid for s in series)
            for study in studies:
                assert study.patient_id in patients
                assert study.series_count in (None, per_study[study.study_uid])
            assert {s.study_uid for s in series} == {s.study_uid for s in studies}
            # Narrow queries return exactly the matching part of the collection-wide one.
            first = series[0]
            by_patient = await client.series(collection.name, patient_id=first.patient_id)
            assert {s.series_uid for s in by_patient} == {
                s.series_uid for s in series if s.patient_id == first.patient_id}
            by_study = await client.series(collection.name, study_uid=first.study_uid)
            assert {s.series_uid for s in by_study} == {
                s.series_uid for s in series if s.study_uid == first.study_uid}
            narrow = await client.studies(collection.name, first.patient_id)
            assert {s.study_uid for s in narrow} == {
                s.study_uid for s in studies if s.patient_id == first.patient_id}
            (patient,) = await client.patients(collection.name, first.patient_id)
            assert patient.patient_id == first.patient_id


async def _pick_series(client: NbiaClient) -> list[Series]:
    """The smallest multi-image series of the main server, and one of the NLST server."""
    chosen = []
    for host in ("main", "nlst"):
        candidates = []
        for collection in await client.collections():
            if collection.host == host:
                candidates += [s for s in await client.series(collection.name)
                               if (s.image_count or 0) > 1]
        chosen.append(min(candidates, key=lambda s: (s.image_count, s.series_uid)))
    return chosen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", GENERATIONS)
async def test_series_zip_and_single_images_agree(emulator: EmulatorProcess, api: str) -> None:
    async with client_for(emulator, api) as client:
        for series in await _pick_series(client):
            uids = await client.instance_uids(series.collection, series.series_uid)
            total, count = await client.series_size(series.collection, series.series_uid)
            assert len(uids) == count == series.image_count

            singles = []
            for uid in uids:
                async with client.open_instance(series.collection, series.series_uid,
                                                uid) as stream:
                    data = await stream.read()
                    assert stream.size == len(data)
                singles.append(hashlib.md5(data).hexdigest())
            assert sum(1 for _ in singles) == count

            members, sizes = [], 0
            async with client.open_series(series.collection, series.series_uid) as zipped:
                async for member in zipped.members():
                    digest, size = hashlib.md5(), 0
                    async for chunk in member.chunks():
                        digest.update(chunk)
                        size += len(chunk)
                    members.append(digest.hexdigest())
                    sizes += size
            assert Counter(members) == Counter(singles)  # the very same bytes
            assert sizes == total
            if api == "legacy":
                assert zipped.md5s == {}  # the Bindaas ZIP carries no MD5 list
            else:
                assert sorted(zipped.md5s.values()) == sorted(members)
                assert zipped.md5_mismatches() == []
            # v4 getImage starts with a LICENSE; getImageWithMD5Hash (v1/v2) has none.
            assert (zipped.license_text is not None) == (api == "v4")
            assert zipped.complete


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", GENERATIONS)
async def test_unknown_series_and_instances(emulator: EmulatorProcess, api: str) -> None:
    async with client_for(emulator, api) as client:
        (series, _nlst) = await _pick_series(client)
        assert await client.instance_uids(series.collection, "1.2.3.999") == []
        with pytest.raises(NotFound):
            await client.series_size(series.collection, "1.2.3.999")
        with pytest.raises(NotFound):
            async with client.open_series(series.collection, "1.2.3.999"):
                pass
        with pytest.raises(NotFound):
            async with client.open_instance(series.collection, series.series_uid, "1.2.3.4"):
                pass


@pytest.mark.timeout(60)
async def test_listings_survive_injected_faults(faults: EmulatorProcess) -> None:
    async with client_for(faults, "v4") as baseline_client:
        baseline = await snapshot(baseline_client)
    set_faults(faults, {"p503": 0.3, "p429": 0.15, "retry_after": 1, "preset": 0.25,
                        "endpoints": ["getCollectionValues", "getPatient", "getPatientStudy",
                                      "getSeries"], "seed": 11})
    async with client_for(faults, "v4", retries=10) as client:
        assert await snapshot(client) == baseline
        assert client.stats.retries > 0


@pytest.mark.timeout(60)
async def test_downloads_retry_before_the_first_byte_and_report_cuts_after(
        faults: EmulatorProcess) -> None:
    async with client_for(faults, "v4", retries=10) as client:
        series, _nlst = await _pick_series(client)
        uid = (await client.instance_uids(series.collection, series.series_uid))[0]
        async with client.open_instance(series.collection, series.series_uid, uid) as stream:
            expected = await stream.read()

        # Status faults happen before the first byte: the client retries them itself.
        set_faults(faults, {"p503": 0.5, "p429": 0.3, "retry_after": 1,
                            "endpoints": ["getSingleImage", "getImage"], "seed": 3})
        for _ in range(4):
            async with client.open_instance(series.collection, series.series_uid,
                                            uid) as stream:
                assert await stream.read() == expected
        async with client.open_series(series.collection, series.series_uid) as zipped:
            assert len([m async for m in zipped.members()]) == series.image_count
        assert client.stats.retries > 0

        # A connection reset mid-body is the caller's to retry: it must be reported.
        set_faults(faults, {"preset": 1.0, "endpoints": ["getSingleImage"]})
        with pytest.raises(TruncatedStream):
            async with client.open_instance(series.collection, series.series_uid,
                                            uid) as stream:
                await stream.read()

        # A 200 whose ZIP stops early (no central directory) is a truncated stream too.
        set_faults(faults, {"ptruncate": 1.0, "endpoints": ["getImage"]})
        with pytest.raises(TruncatedStream):
            async with client.open_series(series.collection, series.series_uid) as zipped:
                async for member in zipped.members():
                    await member.skip()


@pytest.mark.timeout(30)
async def test_a_server_that_keeps_failing_fails_promptly(faults: EmulatorProcess) -> None:
    set_faults(faults, {"p503": 1.0, "endpoints": ["getSeries"]})
    async with client_for(faults, "v4", retries=3) as client:
        collection = (await client.collections())[0].name
        start = trio.current_time()
        with pytest.raises(ServerError, match=r"getSeries.*HTTP 503.*4 attempts") as info:
            await client.series(collection)
        assert info.value.status == 503
        assert trio.current_time() - start < 5
    # However many retries are allowed, the deadline bounds the wait.
    async with client_for(faults, "v4", retries=1000, request_deadline=2.0) as client:
        start = trio.current_time()
        with pytest.raises(ServerError, match="getSeries"):
            await client.series(collection)
        assert trio.current_time() - start < 4


@pytest.mark.timeout(30)
async def test_nlst_server_down_is_not_fatal_at_start(emulator: EmulatorProcess) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with NbiaClient(emulator.url, nlst_server=dead, retries=1,
                          backoff_base=0.01) as client:
        await client.start()
        found = await client.collections()
        assert found and all(c.host == "main" for c in found)
        with pytest.raises(ServerError, match="NLST server"):
            await client.series("NLST-Demo-not-on-main")


# -- tokens, users, restricted data (an emulator of our own) ---------------------------


@pytest.fixture(scope="module")
def auth_emulator(demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[EmulatorProcess]:
    users = tmp_path_factory.mktemp("users") / "users.json"
    users.write_text(json.dumps({"alice": {"password": PASSWORD, "collections": ["*"]},
                                 "api_keys": [API_KEY]}))
    emu = start_emulator(demo_data_dir, "--profile", "demo", "--token-lifetime", "2",
                         "--users-file", str(users), nlst=True)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
async def alice(auth_emulator: EmulatorProcess) -> AsyncIterator[NbiaClient]:
    async with client_for(auth_emulator, "v4",
                          credentials=Credentials("alice", PASSWORD)) as client:
        yield client


def emulator_stats(emu: EmulatorProcess) -> dict[str, object]:
    return httpx.get(f"{emu.url}/_emulator/stats", timeout=10).json()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", ["v4", "v2"])
async def test_wrong_password(auth_emulator: EmulatorProcess, api: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with client_for(auth_emulator, api,
                          credentials=Credentials("alice", "not-" + PASSWORD)) as client:
        with pytest.raises(AuthError) as info:
            await client.start()
    assert str(info.value) == "login failed for user 'alice': invalid credentials"
    assert PASSWORD not in caplog.text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", ["v4", "v2"])
async def test_restricted_data_needs_a_grant(auth_emulator: EmulatorProcess, api: str) -> None:
    async with client_for(auth_emulator, api) as guest:
        public = {c.name for c in await guest.collections()}
    async with client_for(auth_emulator, api,
                          credentials=Credentials("alice", PASSWORD)) as client:
        granted = {c.name for c in await client.collections()}
        restricted = granted - public
        assert len(restricted) == 1
        (name,) = restricted
        series = (await client.series(name))[0]
        async with client.open_series(name, series.series_uid) as zipped:
            assert len([m async for m in zipped.members()]) == series.image_count
    async with client_for(auth_emulator, api) as guest:
        assert await guest.series(name) == []
        with pytest.raises(NotFound):
            async with guest.open_series(name, series.series_uid):
                pass


@pytest.mark.timeout(30)
async def test_tokens_are_renewed_across_many_expiries(
        auth_emulator: EmulatorProcess, alice: NbiaClient,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await alice.start()
    baseline = await snapshot(alice)
    series, _nlst = await _pick_series(alice)
    uid = (await alice.instance_uids(series.collection, series.series_uid))[0]
    tokens_seen = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(alice.run_token_refresher)
        end = trio.current_time() + 6.5  # more than three token lifetimes
        while trio.current_time() < end:
            assert await snapshot(alice) == baseline  # never an empty listing
            async with alice.open_instance(series.collection, series.series_uid,
                                           uid) as stream:
                assert len(await stream.read()) == stream.size
            token = alice.tokens["main"].token
            assert token is not None
            tokens_seen.add(token.access)
            await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert len(tokens_seen) >= 3
    assert alice.stats.token_refreshes >= 3
    assert alice.stats.errors == {}
    for secret in (PASSWORD, *tokens_seen):
        assert secret not in caplog.text


@pytest.mark.timeout(30)
async def test_background_refresher_renews_an_idle_token(
        auth_emulator: EmulatorProcess, alice: NbiaClient) -> None:
    await alice.start()
    manager = alice.tokens["main"]
    first = manager.token
    assert first is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(alice.run_token_refresher)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert manager.token is not None and manager.token.access != first.access
    assert manager.is_fresh(manager.token)


@pytest.mark.timeout(30)
async def test_a_revoked_token_never_yields_a_confident_empty_listing(
        auth_emulator: EmulatorProcess) -> None:
    credentials = Credentials("alice", PASSWORD)
    async with client_for(auth_emulator, "v4", credentials=credentials,
                          empty_recheck_age=0.3) as client:
        collection = (await client.collections())[0].name
        expected = await client.series(collection)
        token = client.tokens["main"].token
        assert token is not None
        # Revoke the session behind the client's back: the emulator, like the real
        # service, then answers getSeries with 200 and an empty body.
        httpx.post(f"{auth_emulator.url}/nbia-api/logout",
                   headers={"Authorization": f"Bearer {token.access}"}, timeout=10)
        await trio.sleep(0.4)
        assert await client.series(collection) == expected
        assert client.stats.empty_rechecks == 1
        # getCollectionValues answers the same situation with a 401 instead.
        token = client.tokens["main"].token
        assert token is not None
        httpx.post(f"{auth_emulator.url}/nbia-api/logout",
                   headers={"Authorization": f"Bearer {token.access}"}, timeout=10)
        assert [c.name for c in await client.collections()][0] == collection


@pytest.mark.timeout(30)
async def test_logout_on_close(auth_emulator: EmulatorProcess) -> None:
    before = emulator_stats(auth_emulator)["requests"].get("logout", 0)  # type: ignore[union-attr]
    async with client_for(auth_emulator, "v4",
                          credentials=Credentials("alice", PASSWORD)) as client:
        await client.start()  # logs into the main and (to list it) the NLST server
        token = client.tokens["main"].token
        assert token is not None
        holding = [m for m in client.tokens.values() if m.token is not None]
        assert len(holding) == 2
    after = emulator_stats(auth_emulator)["requests"].get("logout", 0)  # type: ignore[union-attr]
    assert after == before + len(holding)
    assert all(m.token is None for m in holding)
    reply = httpx.get(f"{auth_emulator.url}/nbia-api/services/v4/getCollectionValues",
                      headers={"Authorization": f"Bearer {token.access}"}, timeout=10)
    assert reply.status_code == 401  # the token is dead


@pytest.mark.timeout(30)
async def test_legacy_v3_with_an_api_key(auth_emulator: EmulatorProcess) -> None:
    async with client_for(auth_emulator, "legacy", api_key=API_KEY) as client:
        collections = await client.collections()
        assert collections
        assert await client.series(collections[0].name)
    async with client_for(auth_emulator, "legacy", api_key="wrong-key") as client:
        with pytest.raises(AuthError, match="api_key") as info:
            await client.collections()
        assert "wrong-key" not in str(info.value)


@pytest.mark.timeout(120)
async def test_a_server_found_unreachable_is_tried_once_until_it_answers(
        demo_data_dir: Path) -> None:
    # A port bound but not listening refuses connections, and no other process on the
    # machine can take it meanwhile, as it could a port merely found free.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        await _unreachable_then_back(port, probe, demo_data_dir)


async def _unreachable_then_back(port: int, probe: socket.socket, demo_data_dir: Path) -> None:
    async with NbiaClient(f"http://127.0.0.1:{port}", nlst_server=None, retries=3,
                          backoff_base=0.01, timeout=5) as client:
        asked = client.stats.requests
        with pytest.raises(ServerError, match=r"ConnectError.*gave up after 4 attempts\)"):
            await client.collections()
        assert asked["getCollectionValues"] == 4
        assert set(client.unreachable) == {f"http://127.0.0.1:{port}"}
        with pytest.raises(ServerError, match="gave up after 1 attempt; it could not be "
                                              "reached before"):
            await client.collections()
        assert asked["getCollectionValues"] == 5
        probe.close()  # free for the emulator
        emu = start_emulator(demo_data_dir, "--port", str(port))
        try:
            assert await client.collections()  # back: seen at the first try
            assert asked["getCollectionValues"] == 6 and client.unreachable == {}
        finally:
            emu.stop()
        with pytest.raises(ServerError, match=r"gave up after 4 attempts\)"):
            await client.collections()  # it had answered: retried in full again
