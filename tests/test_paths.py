"""Where tciafs keeps its files, and what it can tell about the disks beneath them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tciafs import paths

pytestmark = pytest.mark.unit


def _line(n: int, point: str, fstype: str) -> str:
    escaped = point.replace("\\", "\\134").replace(" ", "\\040")
    return f"{n} 1 0:{n} / {escaped} rw,relatime shared:{n} - {fstype} src{n} rw"


def test_the_deepest_and_latest_mount_holds_a_path(tmp_path: Path) -> None:
    home = tmp_path / "home dirs"  # a space, escaped in mountinfo
    (home / "u").mkdir(parents=True)
    info = "\n".join([_line(1, "/", "ext4"), _line(2, str(home), "xfs"),
                      _line(3, str(home), "nfs4"),  # mounted over the xfs
                      _line(4, str(tmp_path / "home"), "tmpfs")])  # a prefix, not a parent
    assert paths.filesystem_type(home / "u" / ".cache" / "tciafs", info) == "nfs4"
    assert paths.filesystem_type(home, info) == "nfs4"
    assert paths.filesystem_type(tmp_path, info) == "ext4"
    assert "nfs4" in paths.NETWORK_FILESYSTEMS and "ext4" not in paths.NETWORK_FILESYSTEMS


def test_this_machines_own_mounts_are_read(tmp_path: Path) -> None:
    assert paths.filesystem_type(Path("/proc/self")) == "proc"
    assert paths.filesystem_type(tmp_path / "not" / "yet") == paths.filesystem_type(tmp_path)


@pytest.mark.parametrize(("text", "size"), [("500M", 500 << 20), ("50G", 50 << 30),
                                            ("10GiB", 10 << 30), ("1.5T", int(1.5 * (1 << 40))),
                                            ("123456", 123456)])
def test_sizes_parse(text: str, size: int) -> None:
    assert paths.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-5G", "0", "lots", "5X"])
def test_bad_sizes_say_what_would_do(text: str) -> None:
    with pytest.raises(ValueError, match="try 500M"):
        paths.parse_size(text)
