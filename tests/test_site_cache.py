"""The site cache: a real nginx with contrib/nginx/tciafs-site-cache.conf in front of the
emulator, and four mounts behind it as four nodes of a cluster.

The config file is the one from the repository: only its lines marked "SITE:" (listen
address, upstream URLs, cache directory, log file, CA bundle) are rewritten for loopback. A small
main config around it gives nginx what Debian's /etc/nginx/nginx.conf gives it at a site
(pid file, error log, temp paths), all under the test's tmp directory. That launcher is
scripts/benchlib/nginx.py, which the benchmark's site-cache figure runs too.

The first tests ask nginx directly with httpx and check the facts the config relies on;
the mount tests then show what they buy: one download per series for all nodes, shared
listings, no restricted data for guests, a proxy restart that harms nothing, and no bad
copy that stays in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_mount import _series_zip

from conftest import EmulatorProcess, start_emulator
from mountutil import IMAGE_ENDPOINTS, mounted, needs_fuse, reset_stats, set_faults, stats

# nginx with the repository's config: one launcher for this test and the benchmark.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib.nginx import NGINX, SYSTEM_CAS, Nginx, SiteCache, free_port  # noqa: E402

needs_nginx = pytest.mark.skipif(NGINX is None, reason="needs nginx (scripts/setup installs it)")
pytestmark = [needs_nginx]

V4 = "/nbia-api/services/v4"
PASSWORD = "alices-Pa55word"
RESTRICTED = "Demo-Restricted Prostate_MR"
LUNG = "Demo-Lung CT_2024"
NLST = "NLST-Demo"
REFETCH = {"X-Tciafs-Refetch": "1"}
CACHING_HEADERS = ("cache-control", "expires", "etag", "last-modified", "vary", "set-cookie")

# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("site-users") / "users.json"
    path.write_text(json.dumps({"alice": {"password": PASSWORD, "collections": ["*"]}}))
    return path


@pytest.fixture(scope="module")
def upstream(demo_data_dir: Path, users_file: Path) -> Iterator[EmulatorProcess]:
    """An emulator of our own: its counters and faults are this module's alone."""
    emu = start_emulator(demo_data_dir, "--profile", "demo", "--users-file", str(users_file),
                         nlst=True)
    yield emu
    emu.stop()


@pytest.fixture
def site(upstream: EmulatorProcess, tmp_path: Path) -> Iterator[SiteCache]:
    """A fresh nginx and an empty cache per test; the service's counters start at zero."""
    set_faults(upstream.url)
    assert upstream.nlst_url is not None
    cache = SiteCache(tmp_path / "nginx", upstream.url, upstream.nlst_url)
    cache.start()
    reset_stats(upstream.url)
    try:
        yield cache
    finally:
        cache.stop()
        set_faults(upstream.url)


@pytest.fixture(autouse=True)
def own_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mounts started here must not find the user's login, config or TCIAFS_* settings."""
    for name in ("CONFIG", "STATE", "CACHE", "DATA"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / "xdg" / name.lower()))
    for name in list(os.environ):
        if name.startswith("TCIAFS_"):
            monkeypatch.delenv(name)


# -- helpers -------------------------------------------------------------------------------

def series_of(url: str, collection: str) -> list[dict]:
    r = httpx.get(f"{url}{V4}/getSeries", params={"Collection": collection}, timeout=30)
    r.raise_for_status()
    return r.json() if r.content.strip() else []  # NBIA's empty list is an empty body


def zip_url(base: str, series_uid: str) -> str:
    # Spelled as tciafs spells it, so the tests and the nodes share cache entries.
    return f"{base}{V4}/getImage?SeriesInstanceUID={series_uid}&IncludeMD5=Yes"


def zip_entries(body: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    """A series ZIP's DICOM entries by name, and its MD5 list by name."""
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        files = {n: zf.read(n) for n in zf.namelist() if n.endswith(".dcm")}
        listed = {}
        if "md5hashes.csv" in zf.namelist():
            rows = zf.read("md5hashes.csv").decode().strip().splitlines()[1:]
            listed = dict(row.split(",") for row in rows)
    return files, listed


def assert_zip_whole(body: bytes, image_count: int) -> None:
    files, listed = zip_entries(body)
    assert len(files) == image_count
    assert {n: hashlib.md5(d).hexdigest() for n, d in files.items()} == listed


def upstream_count(url: str, endpoint: str, server: str | None = None) -> int:
    snapshot = stats(url)
    counts = snapshot["servers"][server] if server else snapshot
    return counts["requests"].get(endpoint, 0)


def token_for(url: str, user: str, password: str) -> str:
    r = httpx.post(f"{url}/nbia-api/oauth/token", timeout=30, data={
        "username": user, "password": password, "grant_type": "password",
        "client_id": "nbia"})
    r.raise_for_status()
    return r.json()["access_token"]


def get_all(urls: list[str]) -> list[httpx.Response]:
    """GET every URL at once, each from its own thread and connection."""
    def one(url: str) -> httpx.Response:
        return httpx.get(url, timeout=120)

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(one, urls))


def node_files(copy: Path) -> dict[str, bytes]:
    return {p.name.removesuffix(".dcm"): p.read_bytes() for p in copy.rglob("*.dcm")}


@contextlib.contextmanager
def nodes(site: SiteCache, tmp_path: Path, count: int) -> Iterator[list[Path]]:
    """`count` mounts, each with its own cache directory, all pointed at the site cache."""
    with contextlib.ExitStack() as stack:
        points = []
        for i in range(count):
            mnt = tmp_path / f"node{i}" / "mnt"
            stack.enter_context(mounted(site, mnt, tmp_path / f"node{i}" / "cache",
                                        "--timeout", "120"))
            points.append(mnt)
        yield points


def copy_on_all(points: list[Path], rel: Path, tmp_path: Path, name: str) -> list[Path]:
    """Copy mnt/rel to a copy of its own on every node at once; the copies' roots."""
    targets = [tmp_path / f"{name}{i}" for i in range(len(points))]
    with ThreadPoolExecutor(len(points)) as pool:
        list(pool.map(lambda pair: shutil.copytree(pair[0] / rel, pair[1]),
                      zip(points, targets, strict=True)))
    return targets


def the_study(mnt: Path, collection: str) -> Path:
    """The collection's study with the most series, relative to the mount point."""
    studies = sorted((mnt / collection).glob("*/*"))
    return max(studies, key=lambda study: len(list(study.iterdir()))).relative_to(mnt)


def assert_nodes_asked_for(site: SiteCache, url: str) -> None:
    """The nodes' series requests were the very one the test put in the cache, so they
    were served the cached copy (else the test would prove nothing)."""
    primed = url.removeprefix(site.url)
    uid = primed.split("SeriesInstanceUID=", 1)[1].split("&", 1)[0]
    asked = [line for line in site.log() if line.endpoint == "getImage" and uid in line.uri]
    assert {line.uri for line in asked} == {primed}
    assert [line for line in asked if line.cache == "HIT"]


def settled(series_dir: Path, truth: dict[str, bytes], wait: float = 60.0) -> bool:
    """Whether the mount serves the service's bytes for the whole series within `wait`
    seconds (a series fetch still under way may be mending files)."""
    deadline = time.monotonic() + wait
    while node_files(series_dir) != truth:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def assert_copies_whole(copies: list[Path], series: list[str], url: str) -> None:
    """Every node has every file of every series, byte for byte as the service stores it."""
    truth: dict[str, bytes] = {}
    for uid in series:
        files, md5s = _series_zip(url, uid)
        assert all(hashlib.md5(data).hexdigest() == md5s[sop] for sop, data in files.items())
        truth.update(files)
    for copy in copies:
        got = node_files(copy)
        assert got.keys() == truth.keys()
        assert all(got[sop] == truth[sop] for sop in truth), copy


# -- the facts the config relies on ------------------------------------------------------

def test_nginx_has_the_modules_the_config_and_docs_name() -> None:
    """TLS to TCIA now; the slice module for ranged reads of IDC's buckets later."""
    assert NGINX is not None
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    assert "--with-http_ssl_module" in built and "--with-http_slice_module" in built
    assert "--without-http_proxy_module" not in built and "--without-http_map" not in built


def test_the_service_sends_no_caching_headers_and_streams_zips_unsized(
        upstream: EmulatorProcess) -> None:
    series = series_of(upstream.url, LUNG)[0]
    listing = httpx.get(f"{upstream.url}{V4}/getCollectionValues", timeout=30)
    image = httpx.get(zip_url(upstream.url, series["SeriesInstanceUID"]), timeout=60)
    for r in (listing, image):
        assert r.status_code == 200
        assert not [h for h in CACHING_HEADERS if h in r.headers]
    assert image.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in image.headers


def test_successful_answers_are_kept_though_nothing_says_they_may_be(
        site: SiteCache, upstream: EmulatorProcess) -> None:
    series = series_of(site.url, LUNG)[0]
    url = zip_url(site.url, series["SeriesInstanceUID"])
    first, second = httpx.get(url, timeout=60), httpx.get(url, timeout=60)
    assert (first.headers["x-cache-status"], second.headers["x-cache-status"]) == ("MISS", "HIT")
    assert first.content == second.content
    assert_zip_whole(second.content, series["ImageCount"])
    again = httpx.get(f"{site.url}{V4}/getSeries", params={"Collection": LUNG}, timeout=30)
    assert again.headers["x-cache-status"] == "HIT"
    assert upstream_count(upstream.url, "getImage") == 1
    assert upstream_count(upstream.url, "getSeries") == 1


def test_the_lock_makes_concurrent_misses_wait_for_one_fetch(
        site: SiteCache, upstream: EmulatorProcess) -> None:
    series = series_of(site.url, LUNG)[0]
    # Slower than nginx's 5 s defaults for the lock's timeout and age: with them, waiters
    # would go to the service themselves after 5 s.
    set_faults(upstream.url, first_byte_delay_ms=6500, endpoints=["getImage"])
    started = time.monotonic()
    answers = get_all([zip_url(site.url, series["SeriesInstanceUID"])] * 4)
    assert time.monotonic() - started > 6
    assert [r.status_code for r in answers] == [200] * 4
    assert len({r.content for r in answers}) == 1
    assert_zip_whole(answers[0].content, series["ImageCount"])
    assert upstream_count(upstream.url, "getImage") == 1


def test_requests_with_a_login_bypass_the_cache_both_ways(
        site: SiteCache, upstream: EmulatorProcess) -> None:
    url = f"{site.url}{V4}/getCollectionValues"
    bearer = {"Authorization": f"Bearer {token_for(upstream.url, 'alice', PASSWORD)}"}
    # A user's answer first: it must not be stored for the guest who asks next ...
    as_alice = httpx.get(url, headers=bearer, timeout=30)
    assert as_alice.headers["x-cache-status"] == "BYPASS"
    assert RESTRICTED in as_alice.text
    as_guest = httpx.get(url, timeout=30)
    assert as_guest.headers["x-cache-status"] == "MISS"
    assert LUNG in as_guest.text and RESTRICTED not in as_guest.text
    # ... and the guest's stored answer is not what the user gets.
    again = httpx.get(url, headers=bearer, timeout=30)
    assert again.headers["x-cache-status"] == "BYPASS" and RESTRICTED in again.text
    assert httpx.get(url, timeout=30).headers["x-cache-status"] == "HIT"
    assert upstream_count(upstream.url, "getCollectionValues") == 3


def test_the_refetch_header_replaces_the_cached_copy(
        site: SiteCache, upstream: EmulatorProcess) -> None:
    series = series_of(site.url, LUNG)[0]
    url = zip_url(site.url, series["SeriesInstanceUID"])
    set_faults(upstream.url, pcorrupt=1.0, endpoints=["getImage"])
    damaged = httpx.get(url, timeout=60)
    set_faults(upstream.url)
    files, listed = zip_entries(damaged.content)
    assert all(hashlib.md5(d).hexdigest() != listed[n] for n, d in files.items())
    cached = httpx.get(url, timeout=60)
    assert cached.headers["x-cache-status"] == "HIT" and cached.content == damaged.content
    fresh = httpx.get(url, headers=REFETCH, timeout=60)
    assert fresh.headers["x-cache-status"] == "BYPASS"
    assert_zip_whole(fresh.content, series["ImageCount"])
    after = httpx.get(url, timeout=60)
    assert after.headers["x-cache-status"] == "HIT" and after.content == fresh.content
    assert upstream_count(upstream.url, "getImage") == 2


def test_a_node_that_leaves_mid_download_still_fills_the_cache(
        site: SiteCache, upstream: EmulatorProcess) -> None:
    """A cacheable answer is fetched to its end though its client went: a node killed
    mid-copy wastes nothing, and the nodes waiting on the lock get the whole ZIP."""
    series = series_of(site.url, LUNG)[0]
    url = zip_url(site.url, series["SeriesInstanceUID"])
    set_faults(upstream.url, bandwidth=4_000_000)
    with httpx.stream("GET", url, timeout=60) as partial:
        received = 0
        for chunk in partial.iter_bytes():
            received += len(chunk)
            if received > 500_000:
                break
    deadline = time.monotonic() + 30
    while not any(line.endpoint == "getImage" for line in site.log()):
        assert time.monotonic() < deadline, "nginx never finished the ZIP"
        time.sleep(0.2)
    set_faults(upstream.url)
    whole = httpx.get(url, timeout=60)
    assert whole.headers["x-cache-status"] == "HIT"
    assert_zip_whole(whole.content, series["ImageCount"])
    assert upstream_count(upstream.url, "getImage") == 1


def test_errors_and_cut_bodies_are_not_kept(site: SiteCache, upstream: EmulatorProcess) -> None:
    listing = f"{site.url}{V4}/getSeries?Collection=Demo-Lung%20CT_2024"
    set_faults(upstream.url, p500=1.0, endpoints=["getSeries"])
    assert httpx.get(listing, timeout=30).status_code == 500
    set_faults(upstream.url, p503=1.0, endpoints=["getSeries"])
    assert httpx.get(listing, timeout=30).status_code == 503
    set_faults(upstream.url)
    fine = httpx.get(listing, timeout=30)
    assert fine.status_code == 200 and fine.headers["x-cache-status"] == "MISS"
    assert upstream_count(upstream.url, "getSeries") == 3

    series = fine.json()[0]
    url = zip_url(site.url, series["SeriesInstanceUID"])
    set_faults(upstream.url, ptruncate=1.0, endpoints=["getImage"])
    with pytest.raises(httpx.RemoteProtocolError):  # the node sees the cut too
        httpx.get(url, timeout=60)
    set_faults(upstream.url)
    whole = httpx.get(url, timeout=60)
    assert whole.headers["x-cache-status"] == "MISS"
    assert_zip_whole(whole.content, series["ImageCount"])


def test_over_http_1_0_a_cut_zip_would_be_kept_as_whole(
        upstream: EmulatorProcess, tmp_path: Path) -> None:
    """Why the config says proxy_http_version 1.1: the same file with 1.0 caches a ZIP
    that the service cut short, because the body then ends at the close."""
    set_faults(upstream.url)
    assert upstream.nlst_url is not None
    variant = SiteCache(tmp_path / "nginx10", upstream.url, upstream.nlst_url)
    text = (variant.root / "site.conf").read_text()
    assert text.count("proxy_http_version 1.1;") == 1
    variant.configure(text.replace("proxy_http_version 1.1;", "proxy_http_version 1.0;"))
    variant.start()
    try:
        series = series_of(upstream.url, LUNG)[0]
        url = zip_url(variant.url, series["SeriesInstanceUID"])
        set_faults(upstream.url, ptruncate=1.0, endpoints=["getImage"])
        cut = httpx.get(url, timeout=60)  # no error: nginx saw a normal end
        set_faults(upstream.url)
        kept = httpx.get(url, timeout=60)
        assert kept.headers["x-cache-status"] == "HIT" and kept.content == cut.content
        with pytest.raises(zipfile.BadZipFile):
            zip_entries(kept.content)
    finally:
        variant.stop()
        set_faults(upstream.url)


def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """A CA of our own and a certificate for "localhost" it signed: (ca, cert, key)."""
    where.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=tciafs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", *ec, "-keyout", "host.key", "-out", "host.csr", "-subj", "/CN=localhost")
    (where / "host.ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "host.pem", "-days", "2", "-extfile", "host.ext")
    return where / "ca.pem", where / "host.pem", where / "host.key"


def tls_front(upstream: EmulatorProcess, port: int, nlst_port: int, cert: Path,
              key: Path) -> str:
    """Servers that put TLS in front of the emulator, as TCIA's front end does; they
    refuse a handshake that does not name "localhost" (no SNI, no service)."""
    servers = []
    for listen, target in ((port, upstream.url), (nlst_port, upstream.nlst_url)):
        servers.append(
            f"server {{ listen 127.0.0.1:{listen} ssl default_server; "
            "ssl_reject_handshake on; }\n"
            f"server {{ listen 127.0.0.1:{listen} ssl; server_name localhost;\n"
            f"  ssl_certificate {cert}; ssl_certificate_key {key};\n"
            f"  location / {{ proxy_pass {target}; proxy_http_version 1.1;\n"
            "    proxy_set_header Connection \"\"; proxy_buffering off; }\n}\n")
    return "".join(servers)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_an_https_upstream_is_named_and_verified(upstream: EmulatorProcess,
                                                 tmp_path: Path) -> None:
    """The admin's case: TCIA over https. With the CA that signed the service's
    certificate the cache works; with the system's CAs alone it refuses the service."""
    set_faults(upstream.url)
    ca, cert, key = make_certificates(tmp_path / "tls")
    front = Nginx(tmp_path / "front", (free_port(), free_port()))
    front.configure(tls_front(upstream, *front.ports, cert, key))
    front.start()
    main, nlst = (f"https://localhost:{port}" for port in front.ports)
    caches: list[SiteCache] = []
    try:
        for name, bundle in (("trusting", str(ca)), ("system", SYSTEM_CAS)):
            caches.append(SiteCache(tmp_path / name, main, nlst, bundle))
            caches[-1].start()
        trusting, system = caches
        for base, collection in ((trusting.url, LUNG), (trusting.nlst_url, NLST)):
            rows = series_of(base, collection)
            assert rows and {r["Collection"] for r in rows} == {collection}
        refused = httpx.get(f"{system.url}{V4}/getCollectionValues", timeout=30)
        assert refused.status_code == 502
        assert "upstream SSL certificate verify error" in system.error_log()
    finally:
        for cache in (*caches, front):
            cache.stop()


# -- four nodes -----------------------------------------------------------------------------

@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_four_nodes_copy_one_study_with_one_download_per_series(
        site: SiteCache, upstream: EmulatorProcess, tmp_path: Path) -> None:
    assert upstream.nlst_url is not None
    with nodes(site, tmp_path, 4) as points:
        lung, nlst = the_study(points[0], LUNG), the_study(points[0], NLST)
        lung_series = [p.name for p in (points[0] / lung).iterdir()]
        nlst_series = [p.name for p in (points[0] / nlst).iterdir()]
        reset_stats(upstream.url)
        with ThreadPoolExecutor(2) as pool:
            copies = list(pool.map(lambda job: copy_on_all(points, job[0], tmp_path, job[1]),
                                   [(lung, "lung"), (nlst, "nlst")]))
    assert upstream_count(upstream.url, "getImage", "main") == len(lung_series)
    assert upstream_count(upstream.url, "getImage", "nlst") == len(nlst_series)
    assert_copies_whole(copies[0], lung_series, upstream.url)
    assert_copies_whole(copies[1], nlst_series, upstream.nlst_url)


def _walk(mnt: Path) -> int:
    """Every directory listed and every file stat'ed, as `find -ls` would."""
    count = 0
    for folder, _dirs, files in os.walk(mnt):
        for name in files:
            os.stat(os.path.join(folder, name))
            count += 1
    return count


@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_four_nodes_share_each_listing(site: SiteCache, upstream: EmulatorProcess,
                                       tmp_path: Path) -> None:
    with nodes(site, tmp_path, 4) as points, ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(_walk, points))
    assert seen[0] > 0 and len(set(seen)) == 1
    served = [line for line in site.log() if line.endpoint not in IMAGE_ENDPOINTS]
    assert served and not [line for line in served if line.cache == "BYPASS"]
    by_uri = Counter(line.uri for line in served)
    went_up = Counter(line.uri for line in served if line.upstream)
    # One trip to the service per endpoint and parameters, whichever node asked first ...
    assert set(went_up.values()) == {1}
    assert went_up.keys() == by_uri.keys()
    # ... which is all the service saw: four nodes asked, and nothing reached it twice.
    upstream_by_endpoint = Counter(line.endpoint for line in served if line.upstream)
    counted = {k: v for k, v in stats(upstream.url)["requests"].items()
               if k not in IMAGE_ENDPOINTS}
    assert counted == dict(upstream_by_endpoint)
    assert by_uri[f"{V4}/getCollectionValues"] >= 4
    assert by_uri[f"/nlst{V4}/getCollectionValues"] >= 4


@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_a_granted_users_series_never_reaches_a_guest(
        site: SiteCache, upstream: EmulatorProcess, tmp_path: Path) -> None:
    creds = tmp_path / "alice.json"
    creds.write_text(json.dumps({"user": "alice", "password": PASSWORD}))
    creds.chmod(0o600)
    bearer = {"Authorization": f"Bearer {token_for(upstream.url, 'alice', PASSWORD)}"}
    hidden = [s["SeriesInstanceUID"] for s in httpx.get(
        f"{upstream.url}{V4}/getSeries", params={"Collection": RESTRICTED}, headers=bearer,
        timeout=30).json()]
    assert hidden and not series_of(upstream.url, RESTRICTED)  # the guest sees none
    alice = tmp_path / "alice" / "mnt"
    with mounted(site, alice, tmp_path / "alice" / "cache", "--credentials-file", str(creds)):
        files = sorted((alice / RESTRICTED).glob("*/*/*/*.dcm"))
        assert files and all(f.read_bytes()[128:132] == b"DICM" for f in files)
        paths = [f.relative_to(alice) for f in files]
        with nodes(site, tmp_path, 2) as guests:
            for guest in guests:
                assert LUNG in os.listdir(guest) and RESTRICTED not in os.listdir(guest)
                for path in paths[:3]:
                    with pytest.raises(OSError):
                        (guest / path).read_bytes()
    secret = [RESTRICTED.replace(" ", "%20"), *hidden]
    touching = [line for line in site.log() if any(s in line.uri for s in secret)]
    assert touching and all(line.cache == "BYPASS" for line in touching)
    # Nothing of it was stored: each cache file holds its key, headers and body.
    needles = [s.encode() for s in (RESTRICTED, *secret)]
    stored = [entry for entry in site.cache_dir.rglob("*") if entry.is_file()]
    assert stored
    for entry in stored:
        body = entry.read_bytes()
        assert not [n for n in needles if n in body], entry


@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_the_proxy_restarts_mid_copy_and_the_nodes_go_on(
        site: SiteCache, upstream: EmulatorProcess, tmp_path: Path) -> None:
    with nodes(site, tmp_path, 4) as points:
        lung = the_study(points[0], LUNG)
        series = [p.name for p in (points[0] / lung).iterdir()]
        # About 7 s for the study's ZIPs: the restart lands in the middle of them.
        set_faults(upstream.url, bandwidth=3_000_000)
        result: list[list[Path]] = []
        copier = threading.Thread(target=lambda: result.append(
            copy_on_all(points, lung, tmp_path, "copy")))
        copier.start()
        time.sleep(2.0)
        assert copier.is_alive()
        site.stop()
        time.sleep(0.3)
        site.start()
        copier.join(timeout=200)
        assert not copier.is_alive() and result
        set_faults(upstream.url)
    assert_copies_whole(result[0], series, upstream.url)
    # And what the cache holds now is whole too.
    for row in series_of(upstream.url, LUNG):
        if row["SeriesInstanceUID"] in series:
            answer = httpx.get(zip_url(site.url, row["SeriesInstanceUID"]), timeout=60)
            assert_zip_whole(answer.content, row["ImageCount"])


@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_a_damaged_zip_in_the_site_cache_is_replaced(
        site: SiteCache, upstream: EmulatorProcess, tmp_path: Path) -> None:
    row = series_of(upstream.url, LUNG)[0]
    url = zip_url(site.url, row["SeriesInstanceUID"])
    set_faults(upstream.url, pcorrupt=1.0, endpoints=["getImage"])
    httpx.get(url, timeout=60)  # the damaged ZIP is now the site's copy
    set_faults(upstream.url)
    assert httpx.get(url, timeout=60).headers["x-cache-status"] == "HIT"
    truth, _ = _series_zip(upstream.url, row["SeriesInstanceUID"])
    with nodes(site, tmp_path, 4) as points:
        rel = next((points[0] / LUNG).glob(f"*/*/{row['SeriesInstanceUID']}"))
        # A reader during the stream may see entries the MD5 list then refuses (the list
        # ends the ZIP); once the series is in, every node serves the service's bytes.
        copy_on_all(points, rel.relative_to(points[0]), tmp_path, "copy")
        for mnt in points:
            assert settled(mnt / rel.relative_to(points[0]), truth)
    assert_nodes_asked_for(site, url)
    assert_zip_whole(httpx.get(url, timeout=60).content, row["ImageCount"])


@pytest.mark.timeout(240)
@needs_fuse
@pytest.mark.mount
def test_a_series_cut_short_once_ends_whole_on_every_node(
        site: SiteCache, upstream: EmulatorProcess, tmp_path: Path) -> None:
    row = series_of(upstream.url, LUNG)[0]
    url = zip_url(site.url, row["SeriesInstanceUID"])
    # A ZIP closed properly with fewer entries, status 200: nginx keeps it as good.
    set_faults(upstream.url, pshort=1.0, endpoints=["getImage"])
    short = httpx.get(url, timeout=60)
    set_faults(upstream.url)
    assert short.status_code == 200
    assert len(zip_entries(short.content)[0]) < row["ImageCount"]
    assert httpx.get(url, timeout=60).headers["x-cache-status"] == "HIT"
    with nodes(site, tmp_path, 4) as points:
        rel = next((points[0] / LUNG).glob(f"*/*/{row['SeriesInstanceUID']}"))
        copies = copy_on_all(points, rel.relative_to(points[0]), tmp_path, "copy")
    assert_nodes_asked_for(site, url)
    assert_copies_whole(copies, [row["SeriesInstanceUID"]], upstream.url)
    assert_zip_whole(httpx.get(url, timeout=60).content, row["ImageCount"])
