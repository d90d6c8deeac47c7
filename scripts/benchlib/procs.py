"""Processes the benchmark drives: the emulator, the tciafs daemon, timed commands."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from tciafs.emulator import launch

STATUS_XATTR = "user.tciafs.status"
VENV_BIN = Path(sys.executable).parent


class BenchError(Exception):
    """A figure could not be measured; the message says why."""


def run_timed(cmd: Sequence[str | Path], *, stdout: IO[bytes] | int = subprocess.DEVNULL,
              cwd: Path | None = None) -> float:
    """Run one real command and return its wall time (time.perf_counter) in seconds."""
    args = [str(c) for c in cmd]
    start = time.perf_counter()
    done = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        raise BenchError(f"{' '.join(args[:3])} ... exited {done.returncode}: {err}")
    return elapsed


@dataclass(frozen=True)
class Shaping:
    latency_ms: float
    bandwidth: int

    def as_faults(self) -> dict[str, float]:
        return {"latency_ms": self.latency_ms, "bandwidth": self.bandwidth}


@dataclass
class Emulator:
    running: launch.RunningEmulator
    shaping: Shaping

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def proc(self) -> subprocess.Popen:
        return self.running.proc

    @property
    def mount_args(self) -> tuple[str, ...]:
        """What a mount needs beside --server: the NLST server, where there is one."""
        nlst = self.running.nlst_url
        return ("--nlst-server", nlst) if nlst else ()

    def api(self, endpoint: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/nbia-api/services/v4/{endpoint}", params=params,
                          timeout=60)
        reply.raise_for_status()
        return reply.json() if reply.content else []

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_emulator/stats", timeout=10).json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_emulator/reset", timeout=10).raise_for_status()

    def set_faults(self, config: dict[str, float]) -> None:
        # A POST replaces the whole configuration, shaping included.
        httpx.post(f"{self.url}/_emulator/faults", json=config, timeout=10).raise_for_status()

    @contextlib.contextmanager
    def unshaped(self) -> Iterator[None]:
        """No latency and no bandwidth cap, for reference downloads that are not timed."""
        self.set_faults({})
        try:
            yield
        finally:
            self.set_faults(self.shaping.as_faults())


@contextlib.contextmanager
def emulator(cmd: Sequence[str], shaping: Shaping, log_path: Path,
             timeout: float = 180.0, nlst: bool = False) -> Iterator[Emulator]:
    """Start an emulator command (one that runs the emulator's CLI), shaped, its stderr
    appended to `log_path`, with its NLST server too if `nlst`; stop it when the block
    ends."""
    shaped = ("--latency-ms", str(shaping.latency_ms), "--bandwidth", str(shaping.bandwidth))
    try:
        running = launch.start(*shaped, command=cmd, log=log_path, timeout=timeout,
                               nlst=nlst)
    except launch.EmulatorStartError as exc:
        raise BenchError(str(exc)) from exc
    with running:
        yield Emulator(running, shaping)


@dataclass
class Mount:
    mountpoint: Path
    cache_dir: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        """The daemon's status document (what `tciafs status --json` prints)."""
        return json.loads(os.getxattr(self.mountpoint, STATUS_XATTR))

    def peak_rss_kib(self) -> int:
        """VmHWM of the daemon: its peak resident set since it started."""
        return _proc_status_kib(self.pid, "VmHWM")

    def wait_idle(self, entries: int, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until nothing is in flight and the cache holds `entries` files."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if not doc.get("in_flight") and doc["cache"]["entries"] >= entries:
                return doc
            if time.monotonic() > deadline:
                raise BenchError(f"cache not complete after {timeout:.0f} s: {doc['cache']}")
            time.sleep(0.1)


class InFlightSampler:
    """Polls the daemon's status (`tciafs status`) in a thread while a command runs,
    keeping the largest number of series downloads in flight at once (diagnosis only)."""

    def __init__(self, mount: Mount, interval: float = 0.1) -> None:
        self.mount = mount
        self.interval = interval
        self.max_series = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                self.max_series = max(self.max_series, len(self.mount.status()["in_flight"]))

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


@contextlib.contextmanager
def mounted(server: str, mountpoint: Path, cache_dir: Path, log_path: Path,
            *extra: str, timeout: float = 60.0) -> Iterator[Mount]:
    """`tciafs mount MNT -f` until the block ends; always unmounted afterwards."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENV_BIN / "tciafs"), "mount", str(mountpoint), "-f", "--server", server,
           "--cache-dir", str(cache_dir), *extra]
    with _foreground_mount(cmd, mountpoint, log_path, timeout) as proc:
        yield Mount(mountpoint, cache_dir, proc, log_path)


@contextlib.contextmanager
def null_mounted(mountpoint: Path, count: int, log_path: Path,
                 timeout: float = 60.0) -> Iterator[Path]:
    """benchlib/nullfs.py with `count` empty files, until the block ends."""
    cmd = [sys.executable, str(Path(__file__).with_name("nullfs.py")), str(mountpoint),
           str(count)]
    with _foreground_mount(cmd, mountpoint, log_path, timeout):
        yield mountpoint


@contextlib.contextmanager
def _foreground_mount(cmd: list[str], mountpoint: Path, log_path: Path,
                      timeout: float) -> Iterator[subprocess.Popen]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        _wait_mounted(mountpoint, proc, log_path, timeout)
        yield proc
    finally:
        unmount(mountpoint, proc)


def _wait_mounted(mountpoint: Path, proc: subprocess.Popen, log_path: Path,
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            raise BenchError(f"the daemon exited {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"the mount was not ready within {timeout:.0f} s; see {log_path}")
        time.sleep(0.02)


def unmount(mountpoint: Path, proc: subprocess.Popen) -> None:
    """Clean unmount, then make sure: kill a daemon that hangs, lazy-unmount what is left."""
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                   check=False)
