"""Shared fixtures: the emulator on loopback, started as a real subprocess, with a client
of it and a way to damage what it sends; a session that never sees the user's own files;
and the test tiers.

Tiers (`pytest -m unit`, `-m handler`, `-m mount`):
- unit: in-process code alone, no server, no mount;
- handler: code driven through its handlers against real servers on loopback (the
  client, the cache and the FUSE handlers against the emulator or a hostile server);
- mount: a real FUSE mount, made by the test.
A test (or its module, through `pytestmark`) carries one tier marker. A module whose
tests differ names the tier of its unmarked ones in DEFAULT_TIER; without either, a test
is taken for handler, the tier that may start servers but never mounts. Mounting without
the mount marker fails the test (see cliutil.require_mount_tier).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cliutil import note_running_test

from tciafs.emulator import launch
from tciafs.sources.nbia import NbiaSource

from mountutil import abort_fuse_mounts_under, set_faults

#: An emulator started by a test (see tciafs.emulator.launch).
EmulatorProcess = launch.RunningEmulator

TIERS = ("unit", "handler", "mount")
UNMARKED_TIER = "handler"

# Where tciafs finds the user's own files; each points into the session's own HOME.
XDG_DIRS = {"XDG_CACHE_HOME": ".cache", "XDG_CONFIG_HOME": ".config",
            "XDG_STATE_HOME": ".local/state", "XDG_DATA_HOME": ".local/share",
            "XDG_RUNTIME_DIR": "run"}
# What else reaches the login, settings (TCIAFS_* too) or service manager of the user.
USER_VARIABLES = ("TCIA_USER", "TCIA_PASSWORD", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier)]
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid}: more than one test tier "
                                    f"({', '.join(tiers)}); mark each test with one")
        if not tiers:
            module = getattr(item, "module", None)
            item.add_marker(getattr(module, "DEFAULT_TIER", UNMARKED_TIER))


@pytest.fixture(scope="session", autouse=True)
def isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME and XDG directories of the session's own, in os.environ so that every
    `tciafs` the tests start inherits them: no test reads or changes the user's cache,
    config, stored login, state or logs."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        for variable, where in XDG_DIRS.items():
            (home / where).mkdir(parents=True, mode=0o700)
            patch.setenv(variable, str(home / where))
        for variable in [*USER_VARIABLES, *(v for v in os.environ if v.startswith("TCIAFS_"))]:
            patch.delenv(variable, raising=False)
        patch.setenv("TCIAFS_SYSTEM_CONFIG", "")  # nor the machine's /etc/tciafs
        yield home


@pytest.fixture(autouse=True)
def running_test(request: pytest.FixtureRequest) -> Iterator[None]:
    note_running_test(request.node)
    try:
        yield
    finally:
        note_running_test(None)




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


@pytest.fixture(scope="module")
def scale_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """The scale-profile emulator (1,000 series of 100 small images), one per test module:
    the modules that use it set faults or count requests of their own."""
    emu = start_emulator(tmp_path_factory.mktemp("scale-archive"), "--profile", "scale")
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
async def client(emulator: EmulatorProcess) -> AsyncIterator[NbiaSource]:
    """The NBIA source of the session's emulator, as the cache's tests use it."""
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10) as c:
        yield c


@pytest.fixture
def damage(emulator: EmulatorProcess) -> Iterator[Callable[..., None]]:
    """Set the emulator's pcorrupt fault for one test, and clear every fault after it."""
    def set_(chance: float, *endpoints: str, seed: int | None = None) -> None:
        set_faults(emulator.url, pcorrupt=chance, endpoints=list(endpoints), seed=seed)
    yield set_
    set_faults(emulator.url)


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
