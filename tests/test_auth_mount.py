"""Logins, tokens that expire mid-copy, restricted collections, every API generation."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cliutil import run_tciafs
from test_mount import _first_ct_series, _series_dirs, _series_zip

from conftest import start_emulator
from mountutil import mounted, needs_fuse, reset_stats, stats

pytestmark = [needs_fuse, pytest.mark.mount]

PASSWORD = "s3cret-Pa55word-do-not-leak"
RESTRICTED = "Demo-Restricted Prostate_MR"
API_KEY = "legacy-key-0123456789"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.json"
    path.write_text(json.dumps({"alice": {"password": PASSWORD, "collections": ["*"]},
                                "bob": {"password": "bobs-password", "collections": []},
                                "api_keys": [API_KEY]}))
    return path


@pytest.fixture(scope="module")
def auth_emulator(demo_data_dir: Path, users_file: Path):
    # Tokens live 3 s and bodies trickle at 3 MB/s, so a copy outlives several tokens.
    emu = start_emulator(demo_data_dir, "--profile", "demo", "--users-file", str(users_file),
                         "--token-lifetime", "3", "--bandwidth", "3000000", nlst=True)
    yield emu
    emu.stop()


@pytest.fixture
def creds_file(tmp_path: Path) -> Path:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"user": "alice", "password": PASSWORD}))
    path.chmod(0o600)
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_STATE_HOME": str(tmp_path / "state")}


def test_guest_never_sees_restricted_data(auth_emulator, tmp_path: Path) -> None:
    with mounted(auth_emulator, tmp_path / "mnt", tmp_path / "cache", "--api", "v2"):
        names = os.listdir(tmp_path / "mnt")
        assert "Demo-Lung CT_2024" in names and RESTRICTED not in names


@pytest.mark.parametrize("api", ["v2", "v4"])
def test_granted_user_reads_restricted_data(auth_emulator, tmp_path: Path, creds_file: Path,
                                            api: str) -> None:
    mnt = tmp_path / "mnt"
    with mounted(auth_emulator, mnt, tmp_path / "cache", "--api", api,
                 "--credentials-file", str(creds_file)):
        assert RESTRICTED in os.listdir(mnt)
        files = sorted((mnt / RESTRICTED).glob("*/*/*/*.dcm"))
        assert files and files[0].read_bytes()[128:132] == b"DICM"


def test_copy_outlives_many_tokens(auth_emulator, tmp_path: Path, creds_file: Path) -> None:
    mnt = tmp_path / "mnt"
    log = tmp_path / "mnt-daemon.log"
    reset_stats(auth_emulator.url)
    started = time.monotonic()
    with mounted(auth_emulator, mnt, tmp_path / "cache", "--api", "v2",
                 "--credentials-file", str(creds_file)) as daemon:
        series = _series_dirs(mnt)
        assert len(series) > 4
        for i, s in enumerate(series):
            # At least four series, and on until two token lifetimes have passed: how
            # long a copy takes is the machine's, not what this test is about.
            if i >= 4 and time.monotonic() - started > 2 * 3:
                break
            shutil.copytree(s, tmp_path / f"copy{i}")
            truth, md5s = _series_zip(auth_emulator.url, s.name)
            got = {p.name.removesuffix(".dcm"): p.read_bytes()
                   for p in (tmp_path / f"copy{i}").glob("*.dcm")}
            assert got == truth
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline
    elapsed = time.monotonic() - started
    assert elapsed > 2 * 3  # the copy outlived at least two token lifetimes
    # Two logins (main and NLST server); every request beyond them is a renewal.
    assert stats(auth_emulator.url)["requests"].get("token", 0) >= 4
    assert PASSWORD not in log.read_text()
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_wrong_password_fails_with_one_line(auth_emulator, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"user": "alice", "password": "wrong-" + PASSWORD}))
    bad.chmod(0o600)
    (tmp_path / "mnt").mkdir()
    result = run_tciafs(
        "mount", str(tmp_path / "mnt"), "--server", auth_emulator.url,
        "--nlst-server", auth_emulator.nlst_url, "--api", "v2",
        "--cache-dir", str(tmp_path / "cache"), "--credentials-file", str(bad),
        env=_env(tmp_path), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alice" in lines[0] and "credentials" in lines[0]
    assert PASSWORD not in result.stderr + result.stdout
    assert not os.path.ismount(tmp_path / "mnt")


def test_readable_credentials_file_is_refused(auth_emulator, tmp_path: Path,
                                              creds_file: Path) -> None:
    creds_file.chmod(0o644)
    (tmp_path / "mnt").mkdir()
    result = run_tciafs(
        "mount", str(tmp_path / "mnt"), "--server", auth_emulator.url,
        "--cache-dir", str(tmp_path / "cache"), "--credentials-file", str(creds_file),
        env=_env(tmp_path), timeout=60)
    assert result.returncode != 0
    assert f"chmod 600 {creds_file}" in result.stderr


def test_login_stores_a_private_file_that_a_mount_uses(auth_emulator, tmp_path: Path) -> None:
    env = _env(tmp_path)
    login = ("login", "--user", "alice", "--server", auth_emulator.url)
    wrong = run_tciafs(*login, input="nope\n", env=env)
    assert wrong.returncode == 1 and "alice" in wrong.stderr and "nope" not in wrong.stderr
    ok = run_tciafs(*login, input=PASSWORD + "\n", env=env)
    assert ok.returncode == 0, ok.stderr
    stored = tmp_path / "config" / "tciafs" / "credentials"
    assert stored.stat().st_mode & 0o077 == 0
    assert (tmp_path / "config" / "tciafs").stat().st_mode & 0o077 == 0
    assert PASSWORD not in ok.stdout + ok.stderr
    mnt = tmp_path / "mnt"
    with mounted(auth_emulator, mnt, tmp_path / "cache", "--api", "v2", env=env):
        assert RESTRICTED in os.listdir(mnt)  # logged in with the stored login
        # Only this test's mount: without --mount, logout reaches every mount there is.
        out = run_tciafs("logout", "--mount", str(mnt), env=env)
        assert out.returncode == 0 and not stored.exists()
        assert f"{mnt}: token revoked" in out.stdout


@pytest.mark.parametrize("api", ["v4", "v2", "v1", "legacy"])
def test_every_generation_gives_the_same_tree_and_bytes(emulator, tmp_path: Path,
                                                        api: str) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache", "--api", api):
        tree = sorted(str(p.relative_to(mnt)) for p in mnt.glob("*/*/*/*/*.dcm"))
        series = _first_ct_series(mnt)
        truth, _ = _series_zip(emulator.url, series.name)
        got = {p.name.removesuffix(".dcm"): p.read_bytes() for p in series.glob("*.dcm")}
        assert got == truth
    with mounted(emulator, tmp_path / "mnt4", tmp_path / "cache4", "--api", "v4"):
        expected = sorted(str(p.relative_to(tmp_path / "mnt4"))
                          for p in (tmp_path / "mnt4").glob("*/*/*/*/*.dcm"))
    assert tree == expected


def test_logout_revokes_a_running_mounts_token(auth_emulator, tmp_path: Path,
                                               creds_file: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(auth_emulator, mnt, tmp_path / "cache", "--api", "v2", "--no-prefetch",
                 "--credentials-file", str(creds_file)):
        files = sorted((mnt / RESTRICTED).glob("*/*/*/*.dcm"))
        assert files[0].read_bytes()[128:132] == b"DICM"
        reset_stats(auth_emulator.url)
        out = run_tciafs("logout", "--mount", str(mnt), env=_env(tmp_path))
        assert out.returncode == 0 and "token revoked" in out.stdout
        assert stats(auth_emulator.url)["requests"].get("logout", 0) >= 1
        with pytest.raises(OSError):  # the guest may not read restricted data ...
            files[1].read_bytes()
        public = next((mnt / "Demo-Lung CT_2024").glob("*/*/*/*.dcm"))
        assert public.read_bytes()[128:132] == b"DICM"  # ... but the rest still reads


def test_legacy_v3_api_key_comes_from_a_private_file(auth_emulator, tmp_path: Path) -> None:
    key = tmp_path / "api-key"
    key.write_text(API_KEY + "\n")
    key.chmod(0o600)
    mnt = tmp_path / "mnt"
    reset_stats(auth_emulator.url)
    with mounted(auth_emulator, mnt, tmp_path / "cache", "--api", "legacy",
                 "--api-key-file", str(key)) as daemon:
        f = next((mnt / "Demo-Lung CT_2024").glob("*/*/*/*.dcm"))
        assert f.read_bytes()[128:132] == b"DICM"
        assert API_KEY.encode() not in Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
    used = stats(auth_emulator.url)["endpoints"]
    assert any(k.startswith("legacy-v3/") for k in used)
    assert API_KEY not in (tmp_path / "mnt-daemon.log").read_text()
    key.chmod(0o644)
    (tmp_path / "m2").mkdir()
    refused = run_tciafs(
        "mount", str(tmp_path / "m2"), "--server", auth_emulator.url, "--api", "legacy",
        "--cache-dir", str(tmp_path / "c2"), "--api-key-file", str(key), env=_env(tmp_path))
    assert refused.returncode == 1 and f"chmod 600 {key}" in refused.stderr
