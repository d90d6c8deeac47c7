"""Fault tolerance of a real mount: random server faults under 16 concurrent readers, a
server that goes away and comes back, and local abuse of the mount.

Every test runs a real `tciafs mount` subprocess against emulators on loopback. Faults
are injected only on emulators these tests start themselves (the session emulator is
used fault-free, for the local-abuse tests).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import re
import resource
import subprocess
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from cliutil import run_tciafs, status_json

from conftest import EmulatorProcess, start_emulator
from mountutil import mounted, needs_fuse, reset_stats, set_faults, stats

pytestmark = [needs_fuse, pytest.mark.mount]

V4 = "/nbia-api/services/v4"
IMAGE_ENDPOINTS = ("getImage", "getSingleImage", "getImageWithMD5Hash")


# -- helpers ---------------------------------------------------------------------------------

def _truth(url: str, series_uid: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The service's bytes of a series by SOP UID, and its MD5 list by SOP UID (no faults)."""
    r = httpx.get(f"{url}{V4}/getImage", params={"SeriesInstanceUID": series_uid,
                                                 "IncludeMD5": "Yes"}, timeout=60)
    r.raise_for_status()
    by_sop: dict[str, bytes] = {}
    md5s: dict[str, str] = {}
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        listed = dict(line.split(",") for line in
                      zf.read("md5hashes.csv").decode().strip().splitlines()[1:])
        for name in zf.namelist():
            if not name.endswith(".dcm"):
                continue
            data = zf.read(name)
            sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                  specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            by_sop[sop] = data
            md5s[sop] = listed[name]
            assert hashlib.md5(data).hexdigest() == listed[name]
    return by_sop, md5s


def _series_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*/*") if p.is_dir())


def _sop(path: Path) -> str:
    return path.name.removesuffix(".dcm")


def _log_of(mnt: Path, cache_dir: Path) -> str:
    return (cache_dir.parent / f"{mnt.name}-daemon.log").read_text(errors="replace")


def _assert_clean_log(log: str) -> None:
    # A traceback or "unexpected error" means an exception escaped tciafs' own handling.
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def _verify_cache(cache_dir: Path) -> subprocess.CompletedProcess:
    return run_tciafs("cache", "verify", "--cache-dir", str(cache_dir), timeout=120)


def _wait_quiet(url: str, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until the emulator has sent nothing for `quiet` seconds (background fetches)."""
    sent, since = -1, time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        now = stats(url)["bytes_sent"]
        if now != sent:
            sent, since = now, time.monotonic()
        time.sleep(0.1)


class CacheSampler(threading.Thread):
    """Samples the cache directory's size while a test runs.

    `files_max` is the largest sum of regular-file sizes seen (what the cache accounts:
    objects, downloads in progress, SQLite files); `du_max` the largest `du -sb`, which
    also counts the directories themselves.
    """

    def __init__(self, cache_dir: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.cache_dir = cache_dir
        self.interval = interval
        self.files_max = 0
        self.du_max = 0
        self.samples = 0
        self._halt = threading.Event()

    def _files_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.cache_dir):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def _du(self) -> int:
        out = subprocess.run(["du", "-sb", str(self.cache_dir)], capture_output=True,
                             text=True).stdout.split()
        return int(out[0]) if out else 0

    def run(self) -> None:
        rounds = 0
        while not self._halt.is_set():
            self.files_max = max(self.files_max, self._files_bytes())
            if rounds % 10 == 0:
                self.du_max = max(self.du_max, self._du())
            self.samples += 1
            rounds += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


@dataclass
class Outcome:
    path: Path
    seconds: float
    error: int | None  # errno, None for a read that returned bytes
    md5: str | None = None


def _read_all(paths: list[Path], outcomes: list[Outcome], stop_at: float) -> None:
    for path in paths:
        if time.monotonic() > stop_at:
            return
        started = time.monotonic()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            outcomes.append(Outcome(path, time.monotonic() - started, exc.errno))
            continue
        outcomes.append(Outcome(path, time.monotonic() - started, None,
                                hashlib.md5(data).hexdigest()))


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scale_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """A dedicated scale-profile emulator (1,000 series of 100 small images) for faults."""
    emu = start_emulator(tmp_path_factory.mktemp("scale-archive"), "--profile", "scale")
    try:
        yield emu
    finally:
        emu.stop()


# -- 1. random faults under 16 concurrent readers --------------------------------------------

READERS = 16
CACHE_BOUND = 10 << 20  # well below the 16 series read (about 16 MB) and their studies
FAULT_PHASE = 15.0  # seconds during which readers start new reads under faults
READ_BOUND = 60.0  # no single read may take longer than this, success or failure
FAULTS = dict(p429=0.08, retry_after=1, p500=0.03, p502=0.03, p503=0.03, p504=0.03,
              preset=0.12, ptruncate=0.12, first_byte_delay_ms=1500, pslow=0.1, seed=20240)


@pytest.mark.timeout(240)
def test_random_faults_under_16_concurrent_readers(scale_emulator: EmulatorProcess,
                                                   tmp_path: Path) -> None:
    url = scale_emulator.url
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    set_faults(url)
    with mounted(scale_emulator, mnt, cache_dir, "--cache-size", str(CACHE_BOUND),
                 "--timeout", "5", "--max-connections", "8") as daemon:
        every = _series_dirs(mnt)
        assert len(every) >= 1000
        chosen = every[:: len(every) // READERS][:READERS]
        files = {s: sorted(s.glob("*.dcm")) for s in chosen}  # listed before any fault
        truth: dict[str, bytes] = {}
        md5s: dict[str, str] = {}
        for series in chosen:
            data, sums = _truth(url, series.name)
            assert set(data) == {_sop(p) for p in files[series]}
            truth.update(data)
            md5s.update(sums)

        sampler = CacheSampler(cache_dir)
        sampler.start()
        reset_stats(url)
        set_faults(url, **FAULTS)
        try:
            outcomes: list[list[Outcome]] = [[] for _ in chosen]
            stop_at = time.monotonic() + FAULT_PHASE
            rng = random.Random(7)
            threads = []
            for series, out in zip(chosen, outcomes, strict=True):
                order = list(files[series])
                rng.shuffle(order)
                t = threading.Thread(target=_read_all, args=(order, out, stop_at),
                                     daemon=True)
                t.start()
                threads.append(t)
            for t in threads:
                t.join(timeout=max(1.0, stop_at + READ_BOUND + 30 - time.monotonic()))
            hung = [s.name for s, t in zip(chosen, threads, strict=True) if t.is_alive()]
            assert not hung, f"readers still blocked: {hung}"
            faulted = stats(url)
        finally:
            set_faults(url)
            sampler.stop()

        flat = [o for out in outcomes for o in out]
        good = [o for o in flat if o.error is None]
        bad = [o for o in flat if o.error is not None]
        log = _log_of(mnt, cache_dir)
        causes = {cause: log.count(cause) for cause in (
            "open failed", "body cut short", "series fetch failed", "gave up after",
            "no such instance (HTTP 500", "cache full")}
        failed = Counter(errno.errorcode.get(o.error, o.error) for o in bad)
        print(f"\nreads under faults: {len(flat)} ({len(good)} ok, failed {dict(failed)}), slowest "
              f"{max(o.seconds for o in flat):.1f} s, slowest failure "
              f"{max((o.seconds for o in bad), default=0):.1f} s; injected "
              f"{faulted['faults']} in {faulted['requests_total']} requests; daemon log: "
              f"{causes}; cache max {sampler.files_max} B in files, du -sb max "
              f"{sampler.du_max} B, bound {CACHE_BOUND} B, {sampler.samples} samples")
        # Every byte delivered is the service's.
        for o in good:
            assert o.md5 == md5s[_sop(o.path)], o.path
        # Every failure is EIO, delivered in bounded time; nothing waits forever. The one
        # exception is a known bug (see test_http_500_on_a_listed_instance_is_eio): two
        # 500s in a row for one getSingleImage give ENOENT, and the log says so.
        not_found = set(re.findall(r"SOPInstanceUID='([^']+)'\) on main: no such instance", log))
        unexplained = [(o.path.name, errno.errorcode.get(o.error, o.error)) for o in bad
                       if o.error != errno.EIO
                       and not (o.error == errno.ENOENT and _sop(o.path) in not_found)]
        assert not unexplained
        assert all(o.seconds < READ_BOUND for o in flat)
        # Each reader got somewhere, and the faults did happen.
        assert all(out for out in outcomes)
        assert len(good) > len(flat) // 2
        injected = faulted["faults"]
        assert injected["429"] and injected["reset"] and injected["truncate"]
        assert sum(injected[k] for k in ("500", "502", "503", "504")) > 0
        assert injected["slow_first_byte"] > 0
        # The cache never went above its bound.
        assert sampler.samples > 20
        assert sampler.files_max <= CACHE_BOUND
        assert sampler.du_max <= CACHE_BOUND

        # Faults cleared: the same mount reads everything that failed, and a sample more.
        again = [o.path for o in bad] + [files[s][-1] for s in chosen]
        for path in again:
            data = path.read_bytes()
            assert hashlib.md5(data).hexdigest() == md5s[_sop(path)] and data == truth[_sop(path)]
        assert daemon.poll() is None
    log = _log_of(mnt, cache_dir)
    _assert_clean_log(log)
    if bad:
        assert "open failed" in log or "open: not found" in log
    result = _verify_cache(cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_http_500_on_a_listed_instance_is_eio(scale_emulator: EmulatorProcess,
                                              tmp_path: Path) -> None:
    url = scale_emulator.url
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    set_faults(url)
    with mounted(scale_emulator, mnt, cache_dir, "--no-prefetch", "--timeout", "5") as daemon:
        series = sorted(p for p in mnt.glob("*/*/*/*") if p.is_dir())[7]
        files = sorted(series.glob("*.dcm"))
        try:
            set_faults(url, p500=1.0, endpoints=["getSingleImage"])
            started = time.monotonic()
            with pytest.raises(OSError) as err:
                files[0].read_bytes()
            seconds = time.monotonic() - started
        finally:
            set_faults(url)
        print(f"\nHTTP 500 on every getSingleImage: {errno.errorcode[err.value.errno]} "
              f"after {seconds:.1f} s")
        assert files[0].read_bytes()[128:132] == b"DICM"  # the file was there all along
        assert daemon.poll() is None
        assert seconds < 30
        assert err.value.errno == errno.EIO


@pytest.mark.timeout(120)
def test_du_of_a_full_cache_stays_within_the_bound(scale_emulator: EmulatorProcess,
                                                   tmp_path: Path) -> None:
    url = scale_emulator.url
    bound = 4 << 20
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    set_faults(url)
    with mounted(scale_emulator, mnt, cache_dir, "--cache-size", str(bound)) as daemon:
        chosen = _series_dirs(mnt)[1::50][:20]  # about 2,000 instances pass through
        def read_first(series: Path) -> None:
            with contextlib.suppress(OSError):  # ENOSPC is a fair answer in so small a cache
                next(iter(sorted(series.glob("*.dcm")))).read_bytes()

        threads = [threading.Thread(target=read_first, args=(s,), daemon=True) for s in chosen]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        _wait_quiet(url)  # the background series fetches have ended
        fs = os.statvfs(mnt)
        accounted = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        du = int(subprocess.run(["du", "-sb", str(cache_dir)], capture_output=True,
                                text=True).stdout.split()[0])
        directories = sum(os.lstat(d).st_size for d, _, _ in os.walk(cache_dir))
        print(f"\nbound {bound}, df used {accounted}, du -sb {du}, of which directories "
              f"{directories}")
        assert daemon.poll() is None
        # What the mount says it uses (df) is what the directory holds (du) ...
        assert du <= accounted + fs.f_frsize
        # ... and that stays within the bound.
        assert du <= bound


# -- 2. the server goes away, and comes back ---------------------------------------------------

UNREACHABLE_BOUND = 30.0  # seconds for an uncached read to fail with --timeout 2


@pytest.mark.timeout(180)
def test_server_unreachable_after_mount_then_back(tmp_path: Path) -> None:
    data_dir = tmp_path / "archive"
    first = start_emulator(data_dir, "--profile", "scale")
    port = first.url.rsplit(":", 1)[1]
    second: EmulatorProcess | None = None
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    try:
        with mounted(first, mnt, cache_dir, "--timeout", "2") as daemon:
            collections = sorted(p for p in mnt.iterdir() if not p.name.startswith("."))
            patient_a, patient_b = sorted(p for p in collections[0].iterdir() if p.is_dir())[:2]
            cached = sorted(p for p in patient_a.glob("*/*") if p.is_dir())[0]
            uncached = sorted(p for p in patient_b.glob("*/*") if p.is_dir())[::3]
            assert len(uncached) >= 3
            truth = {}
            for s in (cached, *uncached):
                truth.update(_truth(first.url, s.name)[0])
            cached_files = sorted(cached.glob("*.dcm"))
            for path in cached_files:
                assert path.read_bytes() == truth[_sop(path)]
            _wait_quiet(first.url)  # the study read-ahead has finished
            listing = subprocess.run(["ls", "-laR", str(patient_a), str(patient_b)],
                                     capture_output=True, text=True, timeout=30)
            assert listing.returncode == 0
            never_listed = collections[-1]
            targets = [sorted(s.glob("*.dcm"))[0] for s in uncached]
            assert all(os.getxattr(p, "user.tcia.cached") == b"none" for p in targets)

            first.proc.kill()  # the server dies without a word
            first.proc.wait(timeout=10)

            # Cached bytes and listings keep working, without a wait.
            started = time.monotonic()
            for path in cached_files:
                assert path.read_bytes() == truth[_sop(path)]
            again = subprocess.run(["ls", "-laR", str(patient_a), str(patient_b)],
                                   capture_output=True, text=True, timeout=30)
            offline_seconds = time.monotonic() - started
            assert again.returncode == 0, again.stderr
            assert again.stdout == listing.stdout
            assert offline_seconds < 10

            # Uncached reads and unlisted directories fail with EIO, in bounded time.
            results: dict[str, tuple[int | None, float]] = {}

            def attempt(key: str, action, *args) -> None:  # noqa: ANN001
                t0 = time.monotonic()
                try:
                    action(*args)
                    results[key] = (None, time.monotonic() - t0)
                except OSError as exc:
                    results[key] = (exc.errno, time.monotonic() - t0)

            threads = [threading.Thread(target=attempt, args=(p.name, Path.read_bytes, p),
                                        daemon=True) for p in targets]
            threads.append(threading.Thread(target=attempt, args=("listdir", os.listdir,
                                                                  never_listed), daemon=True))
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=UNREACHABLE_BOUND + 30)
            assert not any(t.is_alive() for t in threads), "a caller hangs"
            print(f"\nserver down: cached reads + ls -laR in {offline_seconds:.2f} s; "
                  f"failures: { {k: (v[0], round(v[1], 1)) for k, v in results.items()} }")
            assert all(code == errno.EIO for code, _ in results.values()), results
            assert all(seconds < UNREACHABLE_BOUND for _, seconds in results.values())
            assert daemon.poll() is None

            # The server comes back on the same port: the mount recovers by itself.
            second = start_emulator(data_dir, "--profile", "scale", "--port", port)
            assert second.url == first.url
            started = time.monotonic()
            for path in targets:
                assert path.read_bytes() == truth[_sop(path)]
            assert any(p.is_dir() for p in never_listed.iterdir())
            print(f"back: uncached reads work again in {time.monotonic() - started:.2f} s")
            assert daemon.poll() is None
        log = _log_of(mnt, cache_dir)
        _assert_clean_log(log)
        assert "ConnectError" in log  # the reason is in the log
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _mount_in_background(url: str, mnt: Path, cache_dir: Path,
                         *extra: str) -> subprocess.CompletedProcess:
    mnt.mkdir(exist_ok=True)
    return run_tciafs("mount", str(mnt), "--server", url, "--cache-dir", str(cache_dir),
                      "--timeout", "2", *extra, timeout=120)


def _requests_of(mnt: Path) -> dict[str, dict[str, int]]:
    """The daemon's HTTP attempts and failed requests by endpoint, from its status."""
    counts = status_json(mnt)["requests"]
    return {"attempts": counts["requests"], "failed": counts["errors"]}


def _unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        run_tciafs("umount", str(mnt), timeout=60)


@pytest.mark.timeout(240)
def test_a_cache_that_holds_listings_mounts_while_the_service_is_down(
        demo_data_dir: Path, tmp_path: Path) -> None:
    first = start_emulator(demo_data_dir)
    port = first.url.rsplit(":", 1)[1]
    second: EmulatorProcess | None = None
    mnt, cache_dir, chosen_cache = tmp_path / "mnt", tmp_path / "cache", tmp_path / "chosen"
    manifest = tmp_path / "chosen.tcia"
    try:
        with mounted(first, mnt, cache_dir, "--timeout", "2"):
            series = _series_dirs(mnt)
            cached, uncached = series[0], series[-1]
            assert cached.parts[-4] != uncached.parts[-4]  # other collections: no read-ahead
            truth = _truth(first.url, cached.name)[0] | _truth(first.url, uncached.name)[0]
            for path in cached.glob("*.dcm"):
                assert path.read_bytes() == truth[_sop(path)]
            _wait_quiet(first.url)
            target = sorted(uncached.glob("*.dcm"))[0]
            assert os.getxattr(target, "user.tcia.cached") == b"none"
            listing = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True,
                                     timeout=60, check=True).stdout
        manifest.write_text("downloadServerUrl=x\nListOfSeriesToDownload=\n"
                            f"{cached.name}\n")
        with mounted(first, mnt, chosen_cache, "--manifest", str(manifest)):
            chosen_listing = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True,
                                            text=True, timeout=60, check=True).stdout
            assert cached.name in chosen_listing and uncached.name not in chosen_listing

        first.proc.kill()  # the service is gone before the next mount starts
        first.proc.wait(timeout=10)

        never_used = _mount_in_background(first.url, mnt, tmp_path / "empty")
        assert never_used.returncode == 1 and not os.path.ismount(mnt)
        assert "cannot reach" in never_used.stderr

        # Every stored listing is stale (a TTL of 0), and none waits for the dead service.
        started = _mount_in_background(first.url, mnt, cache_dir, "--listing-ttl", "0")
        try:
            assert started.returncode == 0, started.stderr
            assert "offline: cannot reach" in started.stderr
            probed = _requests_of(mnt)
            assert set(probed["attempts"]) == {"getCollectionValues"}  # the start-up probe
            again = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True,
                                   timeout=60)
            assert again.returncode == 0 and again.stdout == listing
            for path in cached.glob("*.dcm"):
                assert path.read_bytes() == truth[_sop(path)]
            assert _requests_of(mnt) == probed
            with pytest.raises(OSError) as failed:
                target.read_bytes()
            assert failed.value.errno == errno.EIO
            now = _requests_of(mnt)
            tried = Counter(now["attempts"]) - Counter(probed["attempts"])
            given_up = Counter(now["failed"]) - Counter(probed["failed"])
            assert tried and tried == given_up  # one attempt each: the probe found it down
            shown = run_tciafs("status", str(mnt), timeout=30)
            assert "started offline: cannot reach" in shown.stdout
            assert "unreachable since" in shown.stdout and first.url in shown.stdout

            second = start_emulator(demo_data_dir, "--port", port)  # back on the same port
            assert target.read_bytes() == truth[_sop(target)]
            shown = run_tciafs("status", str(mnt), timeout=30)
            assert "unreachable" not in shown.stdout  # the mark went with the first answer
        finally:
            _unmount(mnt)

        chosen = _mount_in_background(second.url, mnt, chosen_cache, "--manifest",
                                      str(manifest))
        _unmount(mnt)
        assert chosen.returncode == 0 and "offline" not in chosen.stderr
        second.proc.kill()
        second.proc.wait(timeout=10)
        chosen = _mount_in_background(first.url, mnt, chosen_cache, "--manifest",
                                      str(manifest))
        try:
            assert chosen.returncode == 0, chosen.stderr
            assert "offline: cannot reach" in chosen.stderr
            assert subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True,
                                  timeout=60).stdout == chosen_listing
        finally:
            _unmount(mnt)
    finally:
        first.stop()
        if second is not None:
            second.stop()


# -- 4. local abuse never kills the mount ----------------------------------------------------

@dataclass
class Abuse:
    emulator: EmulatorProcess
    mnt: Path
    cache_dir: Path
    daemon: subprocess.Popen
    series: Path
    file: Path
    truth: dict[str, bytes]

    def alive(self) -> None:
        """The daemon runs, lists and reads exactly."""
        assert self.daemon.poll() is None
        assert any(not p.name.startswith(".") for p in self.mnt.iterdir())
        for path in sorted(self.series.glob("*.dcm"))[:3]:
            assert path.read_bytes() == self.truth[_sop(path)]

    def daemon_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.pid}/fd"))


@pytest.fixture(scope="module")
def abuse(emulator: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Abuse]:
    """One mount of the session's demo emulator (no faults), shared by the abuse tests."""
    base = tmp_path_factory.mktemp("abuse")
    mnt, cache_dir = base / "mnt", base / "cache"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))  # for both sides
    try:
        with mounted(emulator, mnt, cache_dir) as daemon:
            series = next(s for s in _series_dirs(mnt) if len(list(s.glob("*.dcm"))) >= 8)
            truth, _ = _truth(emulator.url, series.name)
            file = sorted(series.glob("*.dcm"))[0]
            assert file.read_bytes() == truth[_sop(file)]
            yield Abuse(emulator, mnt, cache_dir, daemon, series, file, truth)
            assert daemon.poll() is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _assert_clean_log((base / "mnt-daemon.log").read_text(errors="replace"))


REFUSED = {errno.EROFS, errno.EACCES, errno.EPERM}


@pytest.mark.timeout(60)
def test_writes_renames_chmod_and_friends_are_refused(abuse: Abuse) -> None:
    f, series = abuse.file, abuse.series
    study, collection = series.parent, series.parents[2]
    before_file, before_dir = f.read_bytes(), sorted(os.listdir(series))
    actions = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_APPEND": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": lambda: os.open(f, os.O_WRONLY | os.O_TRUNC),
        "create": lambda: os.open(series / "new.dcm", os.O_WRONLY | os.O_CREAT, 0o644),
        "create excl": lambda: os.open(collection / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL),
        "write into root": lambda: (abuse.mnt / "x.txt").write_bytes(b"x"),
        "mkdir": lambda: os.mkdir(series / "sub"),
        "rmdir": lambda: os.rmdir(series),
        "unlink": lambda: os.unlink(f),
        "rename file": lambda: os.rename(f, series / "renamed.dcm"),
        "rename over sibling": lambda: os.rename(f, sorted(series.glob("*.dcm"))[1]),
        "rename dir": lambda: os.rename(series, study / "renamed"),
        "chmod file": lambda: os.chmod(f, 0o777),
        "chmod dir": lambda: os.chmod(series, 0o777),
        "chown": lambda: os.chown(f, os.getuid(), os.getgid()),
        "truncate": lambda: os.truncate(f, 0),
        "utime": lambda: os.utime(f, (0, 0)),
        "symlink": lambda: os.symlink("/etc/passwd", series / "link"),
        "hard link": lambda: os.link(f, series / "hard.dcm"),
        "mkfifo": lambda: os.mkfifo(series / "fifo"),
        "mknod": lambda: os.mknod(series / "node"),
        "setxattr": lambda: os.setxattr(f, "user.evil", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.tcia.id"),
    }
    got = {}
    for name, action in actions.items():
        with pytest.raises(OSError) as err:
            fd = action()
            if isinstance(fd, int):  # opened after all: close it before failing
                os.close(fd)
        got[name] = errno.errorcode.get(err.value.errno, err.value.errno)
        # As root the kernel's permission checks pass: the daemon itself must say EROFS.
        assert err.value.errno in (REFUSED if os.getuid() else {errno.EROFS}), (name, got[name])
    # A descriptor opened for reading cannot write either.
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, b"x")
        assert err.value.errno == errno.EBADF
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 0)
        assert err.value.errno in REFUSED | {errno.EBADF, errno.EINVAL}
    finally:
        os.close(fd)
    print(f"\nrefused: {got}")
    assert f.read_bytes() == before_file
    assert sorted(os.listdir(series)) == before_dir
    abuse.alive()


@pytest.mark.timeout(60)
def test_reads_past_eof_are_empty(abuse: Abuse) -> None:
    truth = abuse.truth[_sop(abuse.file)]
    size = len(truth)
    fd = os.open(abuse.file, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == size
        assert os.lseek(fd, 0, os.SEEK_END) == size
        for offset in (size, size + 1, size + 4096, 1 << 20, 1 << 40, (1 << 62) - 1):
            assert os.pread(fd, 65536, offset) == b"", offset
        assert os.pread(fd, 100, size - 10) == truth[-10:]  # a read across EOF is short
        assert os.pread(fd, 0, 0) == b""
        os.lseek(fd, size + 12345, os.SEEK_SET)
        assert os.read(fd, 10) == b""
    finally:
        os.close(fd)
    with open(abuse.file, "rb") as f:
        assert f.read() == truth and f.read() == b"" and f.read(10) == b""
    abuse.alive()


@pytest.mark.timeout(120)
def test_10000_opens_of_one_file(abuse: Abuse) -> None:
    truth = abuse.truth[_sop(abuse.file)]
    fds_before = abuse.daemon_fds()
    reset_stats(abuse.emulator.url)
    started = time.monotonic()
    for i in range(10_000):
        fd = os.open(abuse.file, os.O_RDONLY)
        try:
            if i % 500 == 0:
                assert os.pread(fd, len(truth) + 1, 0) == truth
        finally:
            os.close(fd)
    seconds = time.monotonic() - started
    print(f"\n10,000 opens and closes in {seconds:.1f} s")
    assert seconds < 90
    # Served from the cache: no request; every handle released in the daemon.
    assert sum(stats(abuse.emulator.url)["requests"].get(e, 0) for e in IMAGE_ENDPOINTS) == 0
    deadline = time.monotonic() + 5
    while abuse.daemon_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # release() comes after close() returns
    assert abuse.daemon_fds() <= fds_before + 2
    abuse.alive()


@pytest.mark.timeout(120)
def test_1000_opens_held_at_once(abuse: Abuse) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"the descriptor limit ({soft}) leaves no room for 1,000 open files")
    files = sorted(abuse.series.glob("*.dcm"))
    fds_before = abuse.daemon_fds()
    held: list[tuple[int, Path]] = []
    try:
        for i in range(1000):
            path = files[i % len(files)]
            held.append((os.open(path, os.O_RDONLY), path))
        # A handle opens its cache file only if a read reaches the daemon: holding a
        # thousand files open costs the daemon no descriptors.
        assert abuse.daemon_fds() <= fds_before + 2
        for fd, path in held[::37]:
            assert os.pread(fd, 1 << 24, 0) == abuse.truth[_sop(path)]
        abuse.alive()  # while they are all held
    finally:
        for fd, _ in held:
            os.close(fd)
    deadline = time.monotonic() + 10
    while abuse.daemon_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abuse.daemon_fds() <= fds_before + 2
    abuse.alive()


def _random_name(rng: random.Random) -> str:
    alphabet = ("abcXYZ0189 .-_%~#@!()[]{}'\"`$&*;<>?|\\=+,:^" "éüß漢字😀"
                "\x01\x02\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f")
    kind = rng.random()
    if kind < 0.1:
        return rng.choice([".Trash-1000", ".Trash", ".git", ".DS_Store", "desktop.ini",
                           "autorun.inf", "._x", ".hidden", "Thumbs.db", "HEAD"])
    if kind < 0.2:  # escapes, non-canonical escapes, cut-name marks
        return rng.choice(["%", "%%", "%2F", "%2f", "%2E", "%2E%2E", "..%2F", "%00", "%~",
                           "x%~0123456789abcdef", "%ZZ", "%4"]) + str(rng.randrange(100))
    length = rng.choice([1, 2, 3, 8, 40, 100, 200, 255])
    name = "".join(rng.choice(alphabet) for _ in range(length))
    while len(name.encode()) > 255:
        name = name[:-1]
    return name if name not in (".", "..") else name + "x"


@pytest.mark.timeout(120)
def test_lookups_of_random_names_are_enoent_without_requests(abuse: Abuse) -> None:
    rng = random.Random(2024)
    series = _series_dirs(abuse.mnt)[-1]  # another branch: listed by this very test
    levels = [abuse.mnt, series.parents[2], series.parents[1], series.parent, series]
    url = abuse.emulator.url
    reset_stats(url)
    for directory in levels:
        existing = set(os.listdir(directory))  # listing first: at most one request each
        for _ in range(400):
            name = _random_name(rng)
            if name in existing:
                continue
            with pytest.raises(OSError) as err:
                os.stat(directory / name)
            assert err.value.errno == errno.ENOENT, (directory, name)
            # The non-canonical spelling of an existing name is not that entry either.
        for real in list(existing)[:20]:
            for variant in (real + " ", real.swapcase(), real.replace("%2F", "%2f")):
                if variant not in existing:
                    with pytest.raises(FileNotFoundError):
                        os.stat(directory / variant)
    for name in ("a" * 256, "é" * 200, "b" * 1100):  # FUSE passes up to 1,024 bytes
        with pytest.raises(OSError) as err:
            os.stat(series / name)
        assert err.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
    with pytest.raises(NotADirectoryError):
        os.stat(abuse.file / "child")
    asked = stats(url)
    print(f"\nrandom lookups: requests {asked['requests']}")
    # Only the directory listings themselves reached the server; no lookup did.
    assert asked["requests_total"] <= len(levels), asked["requests"]
    abuse.alive()
