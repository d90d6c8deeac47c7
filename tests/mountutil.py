"""Real mounts for tests: the daemon as a subprocess, always unmounted afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from cliutil import run_tciafs, start_tciafs

FUSE_USABLE = os.path.exists("/dev/fuse") and bool(
    subprocess.run(["which", "fusermount3"], capture_output=True).returncode == 0)

needs_fuse = pytest.mark.skipif(not FUSE_USABLE, reason="needs /dev/fuse and fusermount3")


CONNECTIONS = Path("/sys/fs/fuse/connections")
NOBODY = 65534  # the unprivileged user of tests that need one


def can_unshare() -> bool:
    """Whether tests may make private mount namespaces (root, with unshare(1))."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def as_nobody() -> list[str]:
    """The command prefix that runs a command as user nobody, with no groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def nobody_runs_tciafs() -> bool:
    """Whether user nobody can run this tciafs (root may switch to it; the interpreter and
    the code must be readable by all)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    return run_tciafs("--version", via=as_nobody(), timeout=60).returncode == 0


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                   timeout=30)


def fuse_mounts_under(root: Path) -> list[tuple[Path, int]]:
    """FUSE mounts below root, each with its connection number (the device's minor).

    Read from mountinfo rather than by stat(), which a hung daemon would never answer.
    """
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        where = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
        if fstype.startswith("fuse") and root in where.parents:
            found.append((where, int(fields[2].split(":")[1])))
    return found


def abort_fuse_mounts_under(root: Path) -> list[Path]:
    """Abort the FUSE connections below root: every request they hold fails at once.

    A test whose daemon stopped answering would otherwise sit in an uninterruptible
    read that no test timeout can end. Needs fusectl (scripts/setup mounts it).
    """
    aborted = []
    for where, connection in fuse_mounts_under(root):
        with contextlib.suppress(OSError):
            (CONNECTIONS / str(connection) / "abort").write_text("1")
            aborted.append(where)
    return aborted


@contextlib.contextmanager
def mounted(emulator, mountpoint: Path, cache_dir: Path, *extra: str,
            timeout: float = 60.0, env: Mapping[str, str] | None = None
            ) -> Iterator[subprocess.Popen]:
    """Run `tciafs mount -f` against the emulator until the block ends."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = ["mount", str(mountpoint), "-f", "--server", emulator.url,
            "--cache-dir", str(cache_dir), *extra]
    if emulator.nlst_url:
        args += ["--nlst-server", emulator.nlst_url]
    log_path = cache_dir.parent / f"{mountpoint.name}-daemon.log"
    with open(log_path, "ab") as log:
        proc = start_tciafs(*args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mount not ready:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if os.path.ismount(mountpoint):
            try:
                subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                               timeout=30)
            except subprocess.TimeoutExpired:
                abort_fuse_mounts_under(mountpoint.parent)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        lazy_unmount(mountpoint)


def stats(url: str) -> dict:
    return httpx.get(f"{url}/_emulator/stats", timeout=10).json()


def reset_stats(url: str) -> None:
    httpx.post(f"{url}/_emulator/reset", timeout=10).raise_for_status()


def set_faults(url: str, **faults: object) -> None:
    httpx.post(f"{url}/_emulator/faults", json=faults, timeout=10).raise_for_status()


IMAGE_ENDPOINTS = ("getImage", "getSingleImage", "getImageWithMD5Hash")


def count_requests(url: str, *endpoints: str) -> int:
    """Requests the emulator saw for these endpoints (bare names) since the last reset."""
    return sum(v for k, v in stats(url)["requests"].items() if k in endpoints)
