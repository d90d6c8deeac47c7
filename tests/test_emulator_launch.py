"""The emulator launcher that the tests, the demo mount and the benchmark share."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tciafs.emulator import launch

SUPPORT = Path(__file__).with_name("test_emulator_support.py")
TINY = (sys.executable, str(SUPPORT))  # the emulator's CLI over the tiny test archive


def test_start_waits_for_both_urls_and_stop_ends_it_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "emulator.log"
    emu = launch.start("--verbose", nlst=True, command=TINY, log=log)
    try:
        for url in (emu.url, emu.nlst_url):
            assert url is not None
            httpx.get(f"{url}/nbia-api/services/v4/getCollectionValues").raise_for_status()
    finally:
        assert emu.stop() == 0  # SIGTERM: the emulator exits 0
    assert emu.log == log and "getCollectionValues" in log.read_text()  # --verbose, to log


def test_an_emulator_that_exits_fails_at_once_and_names_its_log(tmp_path: Path) -> None:
    log = tmp_path / "emulator.log"
    started = time.monotonic()
    with pytest.raises(launch.EmulatorStartError, match=f"exit status 2.*{log}"):
        launch.start("--no-such-flag", command=TINY, log=log, timeout=60)
    assert time.monotonic() - started < 30
    assert "--no-such-flag" in log.read_text()


def test_a_silent_emulator_fails_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(launch.EmulatorStartError, match="printed \\[\\]"):
        launch.start(command=(sys.executable, "-c", "import time; time.sleep(60)"),
                     timeout=1)
    assert time.monotonic() - started < 10  # killed at the deadline, not waited for
