"""A mount whose daemon is stopped (SIGSTOP, a debugger, a machine swapping hard) must
not hold the commands that ask every mount of the user: `tciafs status` and `tciafs cache
stats` give up on it after controlproto.STATUS_TIMEOUT, name it, and go on with the
others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cliutil import start_tciafs

from tciafs.controlproto import STATUS_TIMEOUT

from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def test_a_stopped_daemon_is_named_and_passed_over(emulator, tmp_path: Path) -> None:
    stuck_mnt, live_mnt = tmp_path / "stuck", tmp_path / "live"
    live_cache = tmp_path / "live-cache"
    with mounted(emulator, stuck_mnt, tmp_path / "stuck-cache") as stuck, \
            mounted(emulator, live_mnt, live_cache):
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            # Both at once: each waits out the stuck daemon once.
            status = start_tciafs("status", "--json", stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            stats = start_tciafs("cache", "stats", "--json", "--cache-dir", str(live_cache),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            limit = 4 * STATUS_TIMEOUT  # far from a hang, whatever the machine's load
            status_out, status_err = status.communicate(timeout=limit)
            stats_out, stats_err = stats.communicate(timeout=limit)
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
    assert status.returncode == 0, status_err
    shown = json.loads(status_out)
    assert str(live_mnt) in shown and str(stuck_mnt) not in shown
    assert f"{stuck_mnt}: not a running tciafs mount" in status_err
    assert "does not answer" in status_err
    assert stats.returncode == 0, stats_err
    assert json.loads(stats_out)["mounted_at"] == str(live_mnt)
