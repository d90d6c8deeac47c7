"""Who may mount and command tciafs: a user the FUSE device shuts out is told why and
what fixes it; only a mount's own user (and root) may command it through its socket.

These run tciafs as user nobody, next to root's own mounts, as on a shared machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cliutil import run_tciafs, status_json

from conftest import XDG_DIRS
from mountutil import (
    NOBODY,
    as_nobody,
    can_unshare,
    lazy_unmount,
    mounted,
    needs_fuse,
    nobody_runs_tciafs,
)

pytestmark = [needs_fuse, pytest.mark.mount,
              pytest.mark.skipif(not nobody_runs_tciafs(),
                                 reason="needs root, setpriv, and a tciafs nobody can run")]


@pytest.fixture
def nobodys_home() -> Iterator[Path]:
    """A home of nobody's own; the session's temporary directory is root's alone."""
    top = Path(tempfile.mkdtemp(prefix="tciafs-test-"))
    top.chmod(0o755)
    home = top / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    try:
        yield home
    finally:
        for mountpoint in home.iterdir():
            lazy_unmount(mountpoint)
        shutil.rmtree(top)


def _nobodys_env(home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(home),
            **{variable: str(home / where) for variable, where in XDG_DIRS.items()}}


def _nobodys_dir(home: Path, name: str) -> Path:
    path = home / name
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    return path


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare")
def test_a_fuse_device_the_user_cannot_open_is_named_with_its_fix(emulator, nobodys_home: Path,
                                                                  tmp_path: Path) -> None:
    """libfuse says only "fuse_session_mount failed"; the cause is the device."""
    mnt = _nobodys_dir(nobodys_home, "mnt")
    device = tmp_path / "fuse"  # root's alone, as /dev/fuse is on some machines
    device.touch(mode=0o600)
    # Laid over /dev/fuse in a mount namespace of this command's own: the machine's
    # device stays as it is.
    over_the_device = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --bind "$0" /dev/fuse && exec "$@"', str(device), *as_nobody()]
    done = run_tciafs("mount", str(mnt), "--server", emulator.url,
                      "--nlst-server", emulator.nlst_url,
                      via=over_the_device, env=_nobodys_env(nobodys_home), timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot open /dev/fuse: Permission denied" in done.stderr
    assert "chmod 0666 /dev/fuse" in done.stderr and "--device /dev/fuse" in done.stderr
    assert not os.path.ismount(mnt)


def test_only_the_mounts_own_user_and_root_may_command_it(emulator, nobodys_home: Path,
                                                          tmp_path: Path) -> None:
    """With --allow-other, nobody reads the mount and its status, but a command on its
    socket is refused: as only the owner could write the control file of old."""
    mnt = _nobodys_dir(nobodys_home, "mnt")
    nobody = {"via": as_nobody(), "env": _nobodys_env(nobodys_home)}
    with mounted(emulator, mnt, tmp_path / "cache", "--allow-other", "--no-prefetch"):
        some_file = next(mnt.glob("Demo-Lung CT_2024/*/*/*/*.dcm"))
        assert some_file.read_bytes()[128:132] == b"DICM"
        assert status_json(mnt)["cache"]["entries"] == 1
        shown = run_tciafs("status", str(mnt), "--json", **nobody)
        assert shown.returncode == 0, shown.stderr  # a refusal below is the socket's own
        refused = run_tciafs("cache", "clear", "--mount", str(mnt), **nobody)
        assert refused.returncode == 1 and "Permission denied" in refused.stderr
        assert status_json(mnt)["cache"]["entries"] == 1
        cleared = run_tciafs("cache", "clear", "--mount", str(mnt))
        assert cleared.returncode == 0, cleared.stderr
        assert status_json(mnt)["cache"]["entries"] == 0
