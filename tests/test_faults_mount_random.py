"""Random server faults against a real mount: 16 concurrent readers under 429s, 5xx, resets,
cut bodies and slow first bytes get the service's bytes or EIO in bounded time, within the
cache's bound; an HTTP 500 on a listed instance is EIO; `du` of a full cache stays within
its bound.

Every test runs a real `tciafs mount` subprocess against a scale-profile emulator of its
own: faults are injected only there, never on the session's emulator.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from cliutil import run_tciafs
from faultutil import _assert_clean_log, _log_of, _series_dirs, _sop, _truth, _wait_quiet

from conftest import EmulatorProcess
from mountutil import mounted, needs_fuse, reset_stats, set_faults, stats

pytestmark = [needs_fuse, pytest.mark.mount]


def _verify_cache(cache_dir: Path) -> subprocess.CompletedProcess:
    return run_tciafs("cache", "verify", "--cache-dir", str(cache_dir), timeout=120)


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
