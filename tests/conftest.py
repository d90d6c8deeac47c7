"""Shared fixtures: the emulator on loopback, started as a real subprocess."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tciafs.emulator import launch

from mountutil import abort_fuse_mounts_under

#: An emulator started by a test (see tciafs.emulator.launch).
EmulatorProcess = launch.RunningEmulator


def start_emulator(data_dir: Path, *args: str, nlst: bool = False,
                   timeout: float = 180.0) -> EmulatorProcess:
    """Start `python -m tciafs.emulator` on a free port and wait for its URL line(s)."""
    return launch.start(*args, data_dir=data_dir, nlst=nlst, timeout=timeout)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo archive per test session: generated once, shared by every emulator."""
    return tmp_path_factory.mktemp("demo-archive")


@pytest.fixture(scope="session")
def emulator(demo_data_dir: Path) -> Iterator[EmulatorProcess]:
    """The demo-profile emulator with its NLST server, shared by the whole session."""
    emu = start_emulator(demo_data_dir, "--profile", "demo", nlst=True)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(autouse=True)
def abort_mounts_of_a_hung_test(request: pytest.FixtureRequest,
                                tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Shortly before a test's timeout, abort the FUSE mounts it left hanging, and
    again every 2 s after that, for a mount that hangs only later.

    A read from a daemon that no longer answers waits in the kernel, where the timeout's
    signal cannot reach it; aborting the connection ends the read, so the timeout fails
    this one test instead of stalling the whole run.
    """
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker else float(request.config.getini("timeout"))
    root = tmp_path_factory.getbasetemp()

    done = threading.Event()

    def watch() -> None:
        delay = max(limit - 15, limit * 0.8)
        while not done.wait(delay):
            for where in abort_fuse_mounts_under(root):
                print(f"\n{request.node.nodeid}: aborted the hung FUSE mount {where}",
                      file=sys.stderr)
            delay = 2.0

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
