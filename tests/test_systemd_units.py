"""Every unit in systemd/ passes `systemd-analyze verify` and keeps what FUSE needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
# unit file → (manager, name to verify: templates are verified as an instance).
TABLE = {
    "tciafs@.service": ("user", "tciafs@home-me-tcia.service"),
    "tciafs-system@.service": ("system", "tciafs-system@mnt-tcia.service"),
    "mnt-tcia.mount": ("system", "mnt-tcia.mount"),
    "mnt-tcia.automount": ("system", "mnt-tcia.automount"),
    "tciafs-verify.service": ("user", "tciafs-verify.service"),
    "tciafs-verify.timer": ("user", "tciafs-verify.timer"),
    "tciafs-system-verify@.service": ("system", "tciafs-system-verify@mnt-tcia.service"),
    "tciafs-system-verify@.timer": ("system", "tciafs-system-verify@mnt-tcia.timer"),
}
# Where the units expect the tciafs command; the test puts a real one there.
SYSTEM_TCIAFS = "/usr/local/bin/tciafs"
USER_TCIAFS = "%h/.local/bin/tciafs"
COMPLAINT = re.compile(r"unknown|error|invalid|fail|warn|not executable|ignoring|"
                       r"no such file", re.IGNORECASE)

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze")


def unit_files() -> list[str]:
    return sorted(p.name for p in UNITS.iterdir() if p.name != "README.md")


def test_every_unit_is_verified() -> None:
    assert unit_files() == sorted(TABLE), "add new unit files to TABLE"


class Sandbox:
    """Copies of the units with a real `tciafs` where they expect one."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "units"
        self.home = root / "home"
        self.runtime = root / "runtime"
        self.dir.mkdir()
        self.runtime.mkdir(mode=0o700)
        wrapper = root / "tciafs"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m tciafs \"$@\"\n")
        wrapper.chmod(0o755)
        (self.home / ".local" / "bin").mkdir(parents=True)
        (self.home / ".local" / "bin" / "tciafs").symlink_to(wrapper)
        for name in unit_files():
            text = (UNITS / name).read_text()
            if SYSTEM_TCIAFS in text:  # the user unit finds its copy through %h instead
                assert text.count(SYSTEM_TCIAFS) == 1
                text = text.replace(SYSTEM_TCIAFS, str(wrapper))
            (self.dir / name).write_text(text)

    def verify(self, manager: str, name: str) -> subprocess.CompletedProcess[str]:
        cmd = [ANALYZE, "--no-pager", *(["--user"] if manager == "user" else []), "verify",
               str(self.dir / name)]
        # A user manager needs a runtime directory; %h is the home of whoever runs it.
        env = {**os.environ, "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.runtime),
               "SYSTEMD_LOG_COLOR": "0"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("systemd"))


@needs_analyze
@pytest.mark.parametrize("unit", sorted(TABLE))
def test_systemd_analyze_verify(sandbox: Sandbox, unit: str) -> None:
    manager, name = TABLE[unit]
    result = sandbox.verify(manager, name)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert not COMPLAINT.search(output), output


@needs_analyze
def test_verify_catches_mistakes(sandbox: Sandbox) -> None:
    """The check above can fail: a misspelt key and a missing command are both reported."""
    bad = (UNITS / "tciafs@.service").read_text().replace("Restart=", "Restrat=")
    (sandbox.dir / "broken@.service").write_text(bad)
    result = sandbox.verify("user", "broken@home-me-tcia.service")
    assert "Unknown key 'Restrat'" in result.stderr
    missing = (UNITS / "tciafs@.service").read_text().replace(USER_TCIAFS, "/nonexistent/tciafs")
    (sandbox.dir / "missing@.service").write_text(missing)
    result = sandbox.verify("user", "missing@home-me-tcia.service")
    assert result.returncode != 0 and "is not executable" in result.stderr


def settings(name: str) -> dict[str, list[str]]:
    """Key → values of a unit file (keys may repeat, so not configparser)."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


# Each would hide the mount in a private namespace or stop the setuid fusermount3.
BREAKS_FUSE = ("NoNewPrivileges", "PrivateTmp", "PrivateMounts", "PrivateDevices",
               "PrivateUsers", "ProtectSystem", "ProtectHome", "ReadOnlyPaths",
               "ReadWritePaths", "InaccessiblePaths", "SystemCallFilter", "RestrictNamespaces",
               "RestrictSUIDSGID", "RestrictAddressFamilies", "LockPersonality",
               "MemoryDenyWriteExecute", "ProtectKernelTunables", "DynamicUser")


@pytest.mark.parametrize("unit", ["tciafs@.service", "tciafs-system@.service"])
def test_services_keep_what_the_daemon_relies_on(unit: str) -> None:
    s = settings(unit)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"][0].endswith("tciafs mount %f --foreground")
    assert s["ExecStartPre"] == ["-/usr/bin/fusermount3 -u -z %f"]
    assert s["Restart"] == ["on-failure"] and s["RestartSec"] == ["5"]
    assert s["LoadCredential"] == ["tcia-credentials:%E/tciafs/credentials"]
    assert s["SetCredential"] == ["tcia-credentials:{}"]  # no login → the guest, not a failure
    assert "ExecStop" not in s  # SIGTERM unmounts; see README.md
    assert not set(BREAKS_FUSE) & set(s), "this setting breaks FUSE mounts; see README.md"


def test_mount_units_match_the_fstab_example() -> None:
    mount, auto = settings("mnt-tcia.mount"), settings("mnt-tcia.automount")
    assert mount["What"] == ["tciafs"] and mount["Type"] == ["fuse.tciafs"]
    assert mount["Where"] == auto["Where"] == ["/mnt/tcia"]
    assert mount["Options"] == ["_netdev,nofail,cache_size=50G,api=v4"]
    assert auto["TimeoutIdleSec"]


@pytest.mark.parametrize(("service", "mount"), [
    ("tciafs-verify.service", "tciafs@.service"),
    ("tciafs-system-verify@.service", "tciafs-system@.service")])
def test_verify_services_check_the_cache_their_mount_uses(service: str, mount: str) -> None:
    s, m = settings(service), settings(mount)
    assert s["Type"] == ["oneshot"]
    assert s["ExecStart"] == [m["ExecStart"][0].replace("mount %f --foreground",
                                                         "cache verify --repair")]
    assert s.get("Environment") == m.get("Environment")  # the same config and cache dir
    assert s.get("User") == m.get("User")
    assert s["IOSchedulingClass"] == ["idle"]
    timer = settings(service.replace(".service", ".timer"))
    assert timer["OnCalendar"] == ["weekly"] and timer["Persistent"] == ["true"]
