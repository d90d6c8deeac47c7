"""The commands that talk to a running mount load neither the daemon nor its libraries:
they start fast, and work where a mount could not. Each runs for real, in a fresh
interpreter, which then lists what it loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The cache package itself is light: its index reader and layout serve `cache stats`.
HEAVY = ("trio", "pyfuse3", "pydicom", "httpx",
         "tciafs.mount", "tciafs.fs", "tciafs.tree", "tciafs.control", "tciafs.sources.nbia",
         "tciafs.cache.core", "tciafs.cache.store", "tciafs.cache.prefetch")

# Runs `tciafs ARGS...`, then writes the exit status and the loaded modules to OUT.
PROBE = """
import json, sys
from tciafs import cli
out, args = sys.argv[1], sys.argv[2:]
try:
    code = cli.main(args)
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def _run(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TCIAFS_", "XDG_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"),
               XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"))
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    found = json.loads(out.read_text())
    return found["code"], found["modules"], done.stdout + done.stderr


@pytest.mark.parametrize("args", [
    ["--help"],
    ["status", "{tmp}/not-a-mount"],
    ["umount", "{tmp}/not-a-mount"],
    ["cache", "stats", "--cache-dir", "{tmp}/no-cache"],
    ["cache", "prefetch", "--mount", "{tmp}/not-a-mount", "1.2.3.4.5"],
    # Starting a mount in the background: the daemon loads all that, not the command
    # that waits for it (its checks fail here, on a missing mountpoint).
    ["mount", "{tmp}/missing"],
], ids=lambda args: " ".join(a for a in args if "{tmp}" not in a))
def test_commands_that_talk_to_a_mount_load_no_daemon(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "not-a-mount").mkdir()
    code, modules, output = _run(tmp_path, *(a.format(tmp=tmp_path) for a in args))
    assert code == (0 if args == ["--help"] else 1), output  # each ran to its own end
    assert [m for m in modules if m in HEAVY] == []


def test_the_probe_sees_what_a_command_loads(tmp_path: Path) -> None:
    """The daemon itself (`mount -f`) does load all that: the probe above would see it."""
    code, modules, _ = _run(tmp_path, "mount", "-f", str(tmp_path / "missing"))
    assert code == 1
    assert {"trio", "pyfuse3", "tciafs.mount"} <= set(modules)
