"""A real mount whose service goes away and comes back: cached bytes and listings keep
working, the rest fails with EIO in bounded time and recovers by itself; a cache that
holds listings mounts while the service is down.

Every test runs a real `tciafs mount` subprocess against emulators it starts itself, and
kills them: never the session's emulator.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from cliutil import run_tciafs, status_json
from faultutil import _assert_clean_log, _log_of, _series_dirs, _sop, _truth, _wait_quiet

from conftest import EmulatorProcess, start_emulator
from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


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


def _probe_ended(mnt: Path) -> None:
    """Wait for the background probe of the service to end (its back-off: seconds)."""
    deadline = time.monotonic() + 60
    while status_json(mnt)["service"] == "probing":
        assert time.monotonic() < deadline
        time.sleep(0.2)


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
            assert "in the background" in started.stderr  # ready before the probe ended
            _probe_ended(mnt)
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
            assert "in the background" in chosen.stderr
            assert subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True,
                                  timeout=60).stdout == chosen_listing
        finally:
            _unmount(mnt)
    finally:
        first.stop()
        if second is not None:
            second.stop()
