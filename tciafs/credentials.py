"""Where a mount finds its login, and how `tciafs login` keeps it.

Order: the TCIA_USER / TCIA_PASSWORD environment variables, a file named by
--credentials-file, a systemd credential ($CREDENTIALS_DIRECTORY/tcia-credentials),
then the stored login ($XDG_CONFIG_HOME/tciafs/credentials). A file holds JSON
{"user": ..., "password": ...} and must be readable by its owner only.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tciafs import paths

SYSTEMD_CREDENTIAL = "tcia-credentials"


class CredentialsError(Exception):
    """A credentials file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Login:
    user: str
    password: str = field(repr=False)
    origin: str = "stored login"

    def __str__(self) -> str:
        return f"user {self.user!r} (from {self.origin})"


def stored_path() -> Path:
    return paths.config_home() / "credentials"


def check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"{path} can be read by others (mode {stat.S_IMODE(mode):03o}); "
            f"fix it with: chmod 600 {path}")


def read_file(path: Path, origin: str) -> Login:
    try:
        check_private(path)
        doc = json.loads(path.read_text())
        return Login(str(doc["user"]), str(doc["password"]), origin)
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {path} does not exist") from None
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(
            f'{path} is not a credentials file: expected {{"user": ..., "password": ...}}'
        ) from None


def read_secret(path: Path) -> str:
    """A one-line secret (an API key) from a file only its owner can read."""
    try:
        check_private(path)
        secret = path.read_text().strip()
    except FileNotFoundError:
        raise CredentialsError(f"{path} does not exist") from None
    if not secret:
        raise CredentialsError(f"{path} is empty")
    return secret


def find(env: Mapping[str, str], credentials_file: Path | None = None) -> Login | None:
    """The login a mount should use, or None for the public guest."""
    if env.get("TCIA_USER"):
        if "TCIA_PASSWORD" not in env:
            raise CredentialsError("TCIA_USER is set but TCIA_PASSWORD is not")
        return Login(env["TCIA_USER"], env["TCIA_PASSWORD"], "environment")
    if credentials_file is not None:
        return read_file(credentials_file, str(credentials_file))
    directory = env.get("CREDENTIALS_DIRECTORY")
    cred = Path(directory) / SYSTEMD_CREDENTIAL if directory else None
    # The units fall back to SetCredential=...:{} so that guests can start them too.
    if cred is not None and cred.exists() and cred.read_text().strip() not in ("", "{}"):
        return read_file(cred, "systemd credential")
    if stored_path().exists():
        return read_file(stored_path(), "stored login")
    return None


def store(login: Login) -> Path:
    path = stored_path()
    paths.private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": login.user, "password": login.password}, f)
    os.replace(tmp, path)
    return path


def forget() -> bool:
    path = stored_path()
    if path.exists():
        path.unlink()
        return True
    return False
