"""The one way tests run the `tciafs` command: a subprocess of this interpreter.

It inherits the session's isolated HOME and XDG directories (see conftest.py), so a
command that falls back to the default cache, config or stored login finds the test
session's, never the user's. Commands that act on "every mount" must still be pointed at
the test's own mount (`--mount`, or a path on it): /proc/mounts lists the user's too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

_running: list[pytest.Item] = []  # the test now running, kept by conftest.py


def note_running_test(item: pytest.Item | None) -> None:
    _running[:] = [item] if item is not None else []


def require_mount_tier(what: str) -> None:
    """Fail a test that mounts without the `mount` marker, so `-m "not mount"` never
    mounts: the marker is the promise that a test needs, and makes, a real FUSE mount."""
    if _running and _running[0].get_closest_marker("mount") is None:
        pytest.fail(f"{_running[0].nodeid} {what} but is not marked "
                    "@pytest.mark.mount", pytrace=False)


def tciafs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tciafs", *args]


def run_tciafs(*args: str, env: Mapping[str, str] | None = None, input: str | None = None,
               timeout: float = 120.0, check: bool = False,
               via: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`tciafs ARGS...` to its end, its output captured as text; `via`: a command that
    runs it (e.g. setpriv, to run it as another user)."""
    if args and args[0] == "mount":
        require_mount_tier("runs `tciafs mount`")
    return subprocess.run([*via, *tciafs_argv(*args)], capture_output=True, text=True,
                          env=env, input=input, timeout=timeout, check=check)


def start_tciafs(*args: str, **popen: Any) -> subprocess.Popen:
    """`tciafs ARGS...` in the background; `popen` goes to subprocess.Popen."""
    if args and args[0] == "mount":
        require_mount_tier("runs `tciafs mount`")
    return subprocess.Popen(tciafs_argv(*args), **popen)


def status_json(mountpoint: Path) -> dict:
    """The status document of the test's own mount (`tciafs status MNT --json`)."""
    return json.loads(run_tciafs("status", str(mountpoint), "--json", check=True).stdout)


def status_text(mountpoint: Path) -> str:
    return run_tciafs("status", str(mountpoint), check=True).stdout
