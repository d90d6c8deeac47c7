"""Local abuse never kills a real mount: writes, renames, chmod and their kin are refused;
reads past the end are empty; 10,000 opens of one file and 1,000 held at once; lookups
of random names are ENOENT without a request.

The tests share one mount of the session's demo emulator, used without faults.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultutil import _assert_clean_log, _series_dirs, _sop, _truth

from conftest import EmulatorProcess
from mountutil import mounted, needs_fuse, reset_stats, stats

pytestmark = [needs_fuse, pytest.mark.mount]

IMAGE_ENDPOINTS = ("getImage", "getSingleImage", "getImageWithMD5Hash")


@dataclass
class Abuse:
    emulator: EmulatorProcess
    mnt: Path
    cache_dir: Path
    daemon: subprocess.Popen
    series: Path
    file: Path
    truth: dict[str, bytes]

    def alive(self) -> None:
        """The daemon runs, lists and reads exactly."""
        assert self.daemon.poll() is None
        assert any(not p.name.startswith(".") for p in self.mnt.iterdir())
        for path in sorted(self.series.glob("*.dcm"))[:3]:
            assert path.read_bytes() == self.truth[_sop(path)]

    def daemon_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.pid}/fd"))


@pytest.fixture(scope="module")
def abuse(emulator: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Abuse]:
    """One mount of the session's demo emulator (no faults), shared by the abuse tests."""
    base = tmp_path_factory.mktemp("abuse")
    mnt, cache_dir = base / "mnt", base / "cache"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))  # for both sides
    try:
        with mounted(emulator, mnt, cache_dir) as daemon:
            series = next(s for s in _series_dirs(mnt) if len(list(s.glob("*.dcm"))) >= 8)
            truth, _ = _truth(emulator.url, series.name)
            file = sorted(series.glob("*.dcm"))[0]
            assert file.read_bytes() == truth[_sop(file)]
            yield Abuse(emulator, mnt, cache_dir, daemon, series, file, truth)
            assert daemon.poll() is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _assert_clean_log((base / "mnt-daemon.log").read_text(errors="replace"))


REFUSED = {errno.EROFS, errno.EACCES, errno.EPERM}


@pytest.mark.timeout(60)
def test_writes_renames_chmod_and_friends_are_refused(abuse: Abuse) -> None:
    f, series = abuse.file, abuse.series
    study, collection = series.parent, series.parents[2]
    before_file, before_dir = f.read_bytes(), sorted(os.listdir(series))
    actions = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_APPEND": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": lambda: os.open(f, os.O_WRONLY | os.O_TRUNC),
        "create": lambda: os.open(series / "new.dcm", os.O_WRONLY | os.O_CREAT, 0o644),
        "create excl": lambda: os.open(collection / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL),
        "write into root": lambda: (abuse.mnt / "x.txt").write_bytes(b"x"),
        "mkdir": lambda: os.mkdir(series / "sub"),
        "rmdir": lambda: os.rmdir(series),
        "unlink": lambda: os.unlink(f),
        "rename file": lambda: os.rename(f, series / "renamed.dcm"),
        "rename over sibling": lambda: os.rename(f, sorted(series.glob("*.dcm"))[1]),
        "rename dir": lambda: os.rename(series, study / "renamed"),
        "chmod file": lambda: os.chmod(f, 0o777),
        "chmod dir": lambda: os.chmod(series, 0o777),
        "chown": lambda: os.chown(f, os.getuid(), os.getgid()),
        "truncate": lambda: os.truncate(f, 0),
        "utime": lambda: os.utime(f, (0, 0)),
        "symlink": lambda: os.symlink("/etc/passwd", series / "link"),
        "hard link": lambda: os.link(f, series / "hard.dcm"),
        "mkfifo": lambda: os.mkfifo(series / "fifo"),
        "mknod": lambda: os.mknod(series / "node"),
        "setxattr": lambda: os.setxattr(f, "user.evil", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.tcia.id"),
    }
    got = {}
    for name, action in actions.items():
        with pytest.raises(OSError) as err:
            fd = action()
            if isinstance(fd, int):  # opened after all: close it before failing
                os.close(fd)
        got[name] = errno.errorcode.get(err.value.errno, err.value.errno)
        # As root the kernel's permission checks pass: the daemon itself must say EROFS.
        assert err.value.errno in (REFUSED if os.getuid() else {errno.EROFS}), (name, got[name])
    # A descriptor opened for reading cannot write either.
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, b"x")
        assert err.value.errno == errno.EBADF
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 0)
        assert err.value.errno in REFUSED | {errno.EBADF, errno.EINVAL}
    finally:
        os.close(fd)
    print(f"\nrefused: {got}")
    assert f.read_bytes() == before_file
    assert sorted(os.listdir(series)) == before_dir
    abuse.alive()


@pytest.mark.timeout(60)
def test_reads_past_eof_are_empty(abuse: Abuse) -> None:
    truth = abuse.truth[_sop(abuse.file)]
    size = len(truth)
    fd = os.open(abuse.file, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == size
        assert os.lseek(fd, 0, os.SEEK_END) == size
        for offset in (size, size + 1, size + 4096, 1 << 20, 1 << 40, (1 << 62) - 1):
            assert os.pread(fd, 65536, offset) == b"", offset
        assert os.pread(fd, 100, size - 10) == truth[-10:]  # a read across EOF is short
        assert os.pread(fd, 0, 0) == b""
        os.lseek(fd, size + 12345, os.SEEK_SET)
        assert os.read(fd, 10) == b""
    finally:
        os.close(fd)
    with open(abuse.file, "rb") as f:
        assert f.read() == truth and f.read() == b"" and f.read(10) == b""
    abuse.alive()


@pytest.mark.timeout(120)
def test_10000_opens_of_one_file(abuse: Abuse) -> None:
    truth = abuse.truth[_sop(abuse.file)]
    fds_before = abuse.daemon_fds()
    reset_stats(abuse.emulator.url)
    started = time.monotonic()
    for i in range(10_000):
        fd = os.open(abuse.file, os.O_RDONLY)
        try:
            if i % 500 == 0:
                assert os.pread(fd, len(truth) + 1, 0) == truth
        finally:
            os.close(fd)
    seconds = time.monotonic() - started
    print(f"\n10,000 opens and closes in {seconds:.1f} s")
    assert seconds < 90
    # Served from the cache: no request; every handle released in the daemon.
    assert sum(stats(abuse.emulator.url)["requests"].get(e, 0) for e in IMAGE_ENDPOINTS) == 0
    deadline = time.monotonic() + 5
    while abuse.daemon_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # release() comes after close() returns
    assert abuse.daemon_fds() <= fds_before + 2
    abuse.alive()


@pytest.mark.timeout(120)
def test_1000_opens_held_at_once(abuse: Abuse) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"the descriptor limit ({soft}) leaves no room for 1,000 open files")
    files = sorted(abuse.series.glob("*.dcm"))
    fds_before = abuse.daemon_fds()
    held: list[tuple[int, Path]] = []
    try:
        for i in range(1000):
            path = files[i % len(files)]
            held.append((os.open(path, os.O_RDONLY), path))
        # A handle opens its cache file only if a read reaches the daemon: holding a
        # thousand files open costs the daemon no descriptors.
        assert abuse.daemon_fds() <= fds_before + 2
        for fd, path in held[::37]:
            assert os.pread(fd, 1 << 24, 0) == abuse.truth[_sop(path)]
        abuse.alive()  # while they are all held
    finally:
        for fd, _ in held:
            os.close(fd)
    deadline = time.monotonic() + 10
    while abuse.daemon_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abuse.daemon_fds() <= fds_before + 2
    abuse.alive()


def _random_name(rng: random.Random) -> str:
    alphabet = ("abcXYZ0189 .-_%~#@!()[]{}'\"`$&*;<>?|\\=+,:^" "éüß漢字😀"
                "\x01\x02\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f")
    kind = rng.random()
    if kind < 0.1:
        return rng.choice([".Trash-1000", ".Trash", ".git", ".DS_Store", "desktop.ini",
                           "autorun.inf", "._x", ".hidden", "Thumbs.db", "HEAD"])
    if kind < 0.2:  # escapes, non-canonical escapes, cut-name marks
        return rng.choice(["%", "%%", "%2F", "%2f", "%2E", "%2E%2E", "..%2F", "%00", "%~",
                           "x%~0123456789abcdef", "%ZZ", "%4"]) + str(rng.randrange(100))
    length = rng.choice([1, 2, 3, 8, 40, 100, 200, 255])
    name = "".join(rng.choice(alphabet) for _ in range(length))
    while len(name.encode()) > 255:
        name = name[:-1]
    return name if name not in (".", "..") else name + "x"


@pytest.mark.timeout(120)
def test_lookups_of_random_names_are_enoent_without_requests(abuse: Abuse) -> None:
    rng = random.Random(2024)
    series = _series_dirs(abuse.mnt)[-1]  # another branch: listed by this very test
    levels = [abuse.mnt, series.parents[2], series.parents[1], series.parent, series]
    url = abuse.emulator.url
    reset_stats(url)
    for directory in levels:
        existing = set(os.listdir(directory))  # listing first: at most one request each
        for _ in range(400):
            name = _random_name(rng)
            if name in existing:
                continue
            with pytest.raises(OSError) as err:
                os.stat(directory / name)
            assert err.value.errno == errno.ENOENT, (directory, name)
            # The non-canonical spelling of an existing name is not that entry either.
        for real in list(existing)[:20]:
            for variant in (real + " ", real.swapcase(), real.replace("%2F", "%2f")):
                if variant not in existing:
                    with pytest.raises(FileNotFoundError):
                        os.stat(directory / variant)
    for name in ("a" * 256, "é" * 200, "b" * 1100):  # FUSE passes up to 1,024 bytes
        with pytest.raises(OSError) as err:
            os.stat(series / name)
        assert err.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
    with pytest.raises(NotADirectoryError):
        os.stat(abuse.file / "child")
    asked = stats(url)
    print(f"\nrandom lookups: requests {asked['requests']}")
    # Only the directory listings themselves reached the server; no lookup did.
    assert asked["requests_total"] <= len(levels), asked["requests"]
    abuse.alive()
