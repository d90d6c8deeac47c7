"""Where tciafs keeps its files: XDG directories, private to the user."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Where SQLite's WAL (which shares memory through a file) and its locks are not safe,
# and where a cache would read across the network: the cache belongs on a local disk.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs",
    "beegfs", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs",
    "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse", "fuse.juicefs"})


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "tciafs"


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "tciafs"


def state_home() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "tciafs"


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "tciafs"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def parse_size(text: str) -> int:
    """'50G', '500M', '10GiB', '2T', '123456' → bytes (K/M/G/T are binary multiples)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num = t.rstrip("KMGT")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 500M, 50G or 2T)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"not a size: {text!r} (try 500M, 50G or 2T)")
    return int(value * units[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system that holds `path`, or would once it is created."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    probe = probe.resolve()
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    best, found = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        point = Path(unescape_mount_field(fields[4]))
        # Of nested mounts the deepest holds the path; of stacked ones, the last.
        if (point == probe or point in probe.parents) and len(point.parts) >= best:
            best, found = len(point.parts), fields[fields.index("-", 6) + 1]
    return found


def unescape_mount_field(field: str) -> str:
    """/proc mount tables write space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
