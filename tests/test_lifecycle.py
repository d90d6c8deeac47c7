"""Starting and stopping mounts as a user does: background start, umount, signals,
one-line failures, and the stale mount a killed daemon leaves behind."""

from __future__ import annotations

import errno
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import run_tciafs, status_json

from mountutil import CONNECTIONS, abort_fuse_mounts_under, lazy_unmount, mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XDG_CACHE_HOME": str(tmp_path / "cache-home")}


def _tciafs(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_tciafs(*args, env=_env(tmp_path), timeout=timeout)


def _mount_args(emulator, mnt: Path, tmp_path: Path) -> list[str]:
    return ["mount", str(mnt), "--server", emulator.url, "--nlst-server", emulator.nlst_url,
            "--cache-dir", str(tmp_path / "cache")]


def _daemon_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"tciafs mount {mnt} "], capture_output=True,
                         text=True).stdout.split()
    assert out, "no daemon process"
    return int(out[0])


def test_background_mount_and_umount(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        started = _tciafs(tmp_path, *_mount_args(emulator, mnt, tmp_path))
        assert started.returncode == 0, started.stderr
        assert os.path.ismount(mnt)  # ready when the command returns, not later
        assert "Demo-Lung CT_2024" in os.listdir(mnt)
        pid = _daemon_pid(mnt)
        logs = list((tmp_path / "state" / "tciafs").glob("mount-*.log"))
        assert logs and all(p.stat().st_mode & 0o077 == 0 for p in logs)
        assert os.readlink(f"/proc/{pid}/fd/2") == str(logs[0])  # stderr goes there too
        assert "mounted" in logs[0].read_text()
        stopped = _tciafs(tmp_path, "umount", str(mnt))
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.ismount(mnt)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}")  # the daemon went with its mount
    finally:
        lazy_unmount(mnt)


def test_the_demo_leaves_the_default_cache_to_the_real_mount(emulator, demo_data_dir: Path,
                                                            tmp_path: Path) -> None:
    """`tciafs mount --demo` and then `tciafs mount` run side by side, each with its
    default cache directory: the demo's is its own."""
    demo, real = tmp_path / "demo", tmp_path / "real"
    for mnt in (demo, real):
        mnt.mkdir()
    archive = tmp_path / "data" / "tciafs" / "emulator" / "demo"  # where --demo looks
    archive.parent.mkdir(parents=True)
    archive.symlink_to(demo_data_dir)  # generated once for the whole session
    try:
        started = _tciafs(tmp_path, "mount", "--demo", str(demo))
        assert started.returncode == 0, started.stderr
        started = _tciafs(tmp_path, "mount", str(real), "--server", emulator.url,
                          "--nlst-server", emulator.nlst_url)
        assert started.returncode == 0, started.stderr
        assert status_json(demo)["cache_dir"] == str(tmp_path / "cache-home" / "tciafs-demo")
        assert status_json(real)["cache_dir"] == str(tmp_path / "cache-home" / "tciafs")
        assert os.listdir(demo) == os.listdir(real)
    finally:
        for mnt in (demo, real):
            _tciafs(tmp_path, "umount", str(mnt))
            lazy_unmount(mnt)


def test_a_detached_daemons_log_is_bounded_and_takes_its_stderr(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    script = f"""
import logging, os
from pathlib import Path
from tciafs.cli import DaemonLog
logging.basicConfig(level=logging.INFO, format="%(message)s",
                    handlers=[DaemonLog(Path({str(log)!r}), max_bytes=2000, backups=2)])
for n in range(200):
    logging.info("line %03d %s", n, "x" * 40)
os.write(2, b"straight to stderr\\n")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "daemon.log", "daemon.log.1", "daemon.log.2"]
    assert all(p.stat().st_size <= 2000 + 60 for p in tmp_path.iterdir())
    current = log.read_text()
    assert "line 199" in current and current.endswith("straight to stderr\n")


def test_sigterm_unmounts_cleanly(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache") as daemon:
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)


def test_failures_are_one_line(emulator, tmp_path: Path) -> None:
    missing = _tciafs(tmp_path, *_mount_args(emulator, tmp_path / "nope", tmp_path))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    busy = _tciafs(tmp_path, *_mount_args(emulator, full, tmp_path))
    assert busy.returncode == 1 and "not empty" in busy.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "m2").mkdir()
    unreachable = _tciafs(tmp_path, "mount", str(tmp_path / "m2"), "--server", dead,
                          "--cache-dir", str(tmp_path / "c2"), "--timeout", "2")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    for result in (missing, busy, unreachable):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not os.path.ismount(tmp_path / "m2")


def test_already_mounted_and_shared_cache_are_refused(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache"):
        again = _tciafs(tmp_path, *_mount_args(emulator, mnt, tmp_path))
        assert again.returncode == 1 and "already a mount point" in again.stderr
        (tmp_path / "other").mkdir()
        shared = _tciafs(tmp_path, *_mount_args(emulator, tmp_path / "other", tmp_path))
        assert shared.returncode == 1 and "used by another tciafs mount" in shared.stderr
        assert not os.path.ismount(tmp_path / "other")


def test_stale_mount_of_a_killed_daemon_is_cleared(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache") as daemon:
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        # Nothing else holds the FUSE connection: it went with the daemon.
        with pytest.raises(OSError) as err:
            os.listdir(mnt)
        assert err.value.errno == errno.ENOTCONN
        try:
            started = _tciafs(tmp_path, *_mount_args(emulator, mnt, tmp_path))
            assert started.returncode == 0, started.stderr
            assert "Demo-Lung CT_2024" in os.listdir(mnt)
            assert _tciafs(tmp_path, "umount", str(mnt)).returncode == 0
        finally:
            lazy_unmount(mnt)


def test_demo_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "demo"
    mnt.mkdir()
    try:
        started = _tciafs(tmp_path, "mount", "--demo", str(mnt), "--cache-dir",
                          str(tmp_path / "cache"), timeout=240)
        assert started.returncode == 0, started.stderr
        names = os.listdir(mnt)
        assert "Demo-Lung CT_2024" in names and "NLST-Demo" in names
        f = next(mnt.glob("Demo-Lung CT_2024/*/*/*/*.dcm"))
        assert f.read_bytes()[128:132] == b"DICM"
        assert _tciafs(tmp_path, "umount", str(mnt)).returncode == 0
    finally:
        lazy_unmount(mnt)


@pytest.mark.skipif(not os.path.ismount(CONNECTIONS), reason="fusectl is not mounted")
def test_a_hung_mount_is_aborted_not_waited_for(emulator, tmp_path: Path) -> None:
    """The suite's guard against a daemon that stops answering (tests/conftest.py)."""
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache") as daemon:
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            reader = subprocess.Popen(["ls", str(mnt)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
            with pytest.raises(subprocess.TimeoutExpired):
                reader.wait(timeout=1)  # stuck: nobody answers its readdir
            assert abort_fuse_mounts_under(tmp_path) == [mnt]
            assert reader.wait(timeout=10) != 0
            assert "connect" in reader.stderr.read()  # ENOTCONN or ECONNABORTED
        finally:
            os.kill(daemon.pid, signal.SIGCONT)


@pytest.mark.timeout(12)
@pytest.mark.skipif(not os.path.ismount(CONNECTIONS), reason="fusectl is not mounted")
def test_the_watchdog_frees_a_test_stuck_on_a_hung_mount(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache") as daemon:
        os.kill(daemon.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(OSError) as failed:
                os.listdir(mnt)  # in the kernel until the watchdog aborts the mount
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert failed.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert time.monotonic() - started < 12


_HEAP_GROWTH = """
import sys
from tciafs.mount import steady_heap

def heap() -> int:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                return high - low
    return 0

if sys.argv[1] == "steady":
    assert steady_heap()
block = bytearray(8 << 20)  # freed: glibc would serve blocks up to 8 MiB from the heap
del block
before = heap()
kept = [bytearray(1 << 20) for _ in range(16)]
print(heap() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_steady_heap_keeps_large_buffers_out_of_the_heap() -> None:
    def growth(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _HEAP_GROWTH, mode], check=True,
                              capture_output=True, text=True, timeout=60)
        return int(done.stdout)

    assert growth("default") >= 12 << 20  # what the daemon avoids, shown on this libc
    assert growth("steady") < 2 << 20


def test_the_daemon_raises_its_open_file_limit(emulator, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # a login's default
    try:
        with mounted(emulator, tmp_path / "mnt", tmp_path / "cache") as daemon:
            limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    expected = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    assert int(line.split()[3]) == expected  # the soft limit
