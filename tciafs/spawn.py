"""What `tciafs mount` does before its daemon exists: the mount's options, the checks
before mounting, and starting the daemon in the background until it answers.

Standard library only: the command that starts a mount waits for the daemon, which loads
trio, pyfuse3 and the cache itself; loading them twice, once here too, would add a third
of a second to every mount (tciafs.mount imports this module, never the reverse).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tciafs import paths
from tciafs.defaults import DEFAULT_NLST_SERVER, DEFAULT_SERVER
from tciafs.mounts import MountError, clear_stale_mount

FUSE_DEVICE = "/dev/fuse"


@dataclass
class MountOptions:
    mountpoint: Path
    server: str = DEFAULT_SERVER
    nlst_server: str | None = DEFAULT_NLST_SERVER
    api: str = "v4"
    demo: bool = False
    cache_dir: Path = field(default_factory=paths.cache_home)
    cache_size: int | None = None
    prefetch: bool = True
    listing_ttl: float = 6 * 3600
    max_connections: int = 8
    series_connections: int = 4  # connections one series may use at once
    timeout: float = 30.0
    debug: bool = False
    credentials_file: Path | None = None
    api_key_file: Path | None = None
    layout: str = "uid"
    allow_other: bool = False
    manifest: Path | None = None
    cart: str | None = None
    source: str = "nbia"  # a name of tciafs.sources' registry
    s3_endpoint: str = "https://s3.amazonaws.com"  # IDC: the buckets' S3 endpoint
    idc_catalog: str | None = None  # IDC: idc_index.parquet's path or URL; None: installed


def default_cache_dir(demo: bool) -> Path:
    """$XDG_CACHE_HOME/tciafs, or for the demo tciafs-demo beside it: one daemon holds a
    cache directory, so a demo in the default one would keep the real mount out; and
    not inside it, where `cache stats` would count the demo's files as the real ones."""
    default = paths.cache_home()
    return default.with_name(default.name + "-demo") if demo else default

def default_cache_size(cache_dir: Path) -> int:
    """10 GiB or 10% of the cache disk, whichever is smaller."""
    probe = cache_dir
    while not probe.exists():
        probe = probe.parent
    total = shutil.disk_usage(probe).total
    return min(10 << 30, total // 10)

# -- checks before mounting ----------------------------------------------------------------

def top_fstype(mountpoint: Path) -> str | None:
    """The type of the uppermost filesystem mounted at `mountpoint`, if any."""
    target, found = os.fsencode(mountpoint.absolute()), None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            path = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
            if path == target:
                found = fields[fields.index(b"-") + 1].decode()
    return found


def preflight(mountpoint: Path) -> None:
    clear_stale_mount(mountpoint)
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if top_fstype(mountpoint) == "autofs":
        return  # systemd's automount point: listing it would wait for this very mount
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point (tciafs umount {mountpoint})")
    if any(mountpoint.iterdir()):
        raise MountError(f"mountpoint {mountpoint} is not empty")
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} is missing: load the fuse module (modprobe fuse)")
    unusable = fuse_device_problem()
    if unusable is not None:
        raise MountError(f"cannot mount {mountpoint}: {unusable}")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing: install the fuse3 package")


def fuse_device_problem() -> str | None:
    """Why this user cannot open the FUSE device, with the usual fix; None if it can.

    libfuse opens it before it tries fusermount3, and on failure reports only that
    fuse_session_mount failed: the cause would be left in the log.
    """
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR))  # an unmounted connection: harmless
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (f"cannot open {FUSE_DEVICE}: {exc.strerror}; it must be readable and "
                    "writable by you (it is usually mode 0666: ask the administrator to "
                    "`chmod 0666 /dev/fuse` or to add you to the group that owns it); "
                    "in a container, pass the device in (docker run --device /dev/fuse)")
        return (f"cannot open {FUSE_DEVICE}: {exc.strerror}; load the fuse module "
                "(modprobe fuse)")
    return None

# -- starting in the background ------------------------------------------------------------

def spawn_daemon(argv: list[str], opts: MountOptions, timeout: float = 300.0) -> int:
    """Start the daemon detached and return once the mount answers (or failed)."""
    preflight(opts.mountpoint)
    log_path = log_file_for(opts.mountpoint)
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab", buffering=0) as logf:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tciafs", *argv, "--foreground", "--ready-fd", str(write_fd),
             "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(write_fd,),
            start_new_session=True)
    os.close(write_fd)
    message = _read_ready(read_fd, proc, timeout)
    if message == "ready":
        return 0
    if message.startswith("ready: "):  # mounted, with something the user must know
        print(f"tciafs: {message.removeprefix('ready: ')}", file=sys.stderr)
        return 0
    print(f"tciafs: {message.removeprefix('error: ')} (log: {log_path})", file=sys.stderr)
    return 1


def _read_ready(read_fd: int, proc: subprocess.Popen, timeout: float) -> str:
    import select

    with os.fdopen(read_fd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        line = pipe.readline().decode().strip() if ready else ""
    if line:
        return line
    if proc.poll() is None:
        proc.terminate()
        return f"error: the mount did not become ready within {timeout:.0f} s"
    return f"error: the daemon exited with status {proc.returncode} before mounting"


def log_file_for(mountpoint: Path) -> Path:
    name = str(mountpoint.resolve()).strip("/").replace("/", "-") or "root"
    return paths.private_dir(paths.state_home()) / f"mount-{name}.log"
