"""`tciafs status` on a shared machine: another user's mount, which the caller cannot
enter, is passed over, and the caller's own mount is shown.

As root, the test mounts the emulator (a mount no other user can enter), then runs
tciafs as another user, who mounts the emulator too and asks for the status. The
machine's /dev/fuse may be root's alone: in a private mount namespace, a device node
of the other user's stands in for it, so that their mount is as real as any.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountutil import mounted, needs_fuse

OTHER_UID = 65534  # nobody

pytestmark = [
    needs_fuse, pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                       or shutil.which("setpriv") is None,
                       reason="runs tciafs as another user: needs root, unshare and setpriv"),
]

# $1 the other user's directory, $2 $3 the emulator's URLs. Each tciafs command's output
# and exit status land in that directory as <name>.out and <name>.rc.
AS_OTHER_USER = r"""
home=$1 url=$2 nlst=$3
mount --bind "$home/fuse" /dev/fuse || exit 90
other() { setpriv --reuid=$OTHER --regid=$OTHER --clear-groups "$@"; }
tciafs() {
    name=$1; shift
    other "$PY" -m tciafs "$@" >"$home/$name.out" 2>&1; echo $? >"$home/$name.rc"
}

tciafs before status
other "$PY" -m tciafs mount "$home/mnt" -f --server "$url" --nlst-server "$nlst" \
    --cache-dir "$home/cache" >"$home/daemon.log" 2>&1 &
daemon=$!
trap 'umount -l "$home/mnt" 2>/dev/null; kill $daemon 2>/dev/null; wait $daemon' EXIT
i=0
until other mountpoint -q "$home/mnt"; do
    kill -0 $daemon 2>/dev/null || exit 91
    i=$((i + 1)); [ $i -lt 600 ] || exit 92
    sleep 0.1
done
tciafs json status --json
tciafs text status
tciafs logout logout
other fusermount3 -u "$home/mnt"
wait $daemon
"""


@pytest.fixture
def other_home() -> Iterator[Path]:
    """A directory of the other user's, outside the test's own (root's, mode 0700)."""
    home = Path(tempfile.mkdtemp(prefix="tciafs-other-user-"))
    try:
        (home / "mnt").mkdir()
        os.mknod(home / "fuse", stat.S_IFCHR | 0o600, os.stat("/dev/fuse").st_rdev)
        for path in (home, home / "mnt", home / "fuse"):
            os.chown(path, OTHER_UID, OTHER_UID)
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home / "mnt")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _as_other_user(emulator, home: Path) -> dict[str, tuple[int, str]]:
    env = {"PATH": os.environ["PATH"], "PY": sys.executable, "OTHER": str(OTHER_UID),
           "HOME": str(home), "XDG_CACHE_HOME": str(home / "xdg-cache"),
           "XDG_CONFIG_HOME": str(home / "xdg-config"),
           "XDG_STATE_HOME": str(home / "xdg-state"), "XDG_DATA_HOME": str(home / "xdg-data")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           AS_OTHER_USER, "sh", str(home), emulator.url, emulator.nlst_url],
                          env=env, capture_output=True, text=True, timeout=120)
    log = home / "daemon.log"
    assert done.returncode == 0, (f"exit {done.returncode}: {done.stderr}\n"
                                  f"{log.read_text() if log.exists() else ''}")
    return {rc.stem: (int(rc.read_text()), rc.with_suffix(".out").read_text())
            for rc in home.glob("*.rc")}


def test_status_shows_the_callers_mount_and_passes_over_another_users(
        emulator, tmp_path: Path, other_home: Path) -> None:
    theirs = tmp_path / "mnt"
    with mounted(emulator, theirs, tmp_path / "cache"):
        runs = _as_other_user(emulator, other_home)
    mine = other_home / "mnt"

    code, out = runs["before"]  # only root's mount on the machine: none of the caller's
    assert (code, out) == (1, "tciafs: no tciafs mount of yours found\n")

    code, out = runs["json"]
    assert code == 0, out
    assert list(json.loads(out)) == [str(mine)]
    code, out = runs["text"]
    assert code == 0 and out.startswith(f"{mine}: {emulator.url}"), out
    assert str(theirs) not in out and "Permission denied" not in out

    code, out = runs["logout"]  # the same for the commands that steer every own mount
    assert code == 0, out
    assert f"{mine}: token revoked" in out and str(theirs) not in out
