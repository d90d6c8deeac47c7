"""`tciafs login` and `tciafs logout`: the stored login, checked before it is kept."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from tciafs import controlproto, credentials
from tciafs.defaults import DEFAULT_SERVER
from tciafs.mounts import own_mounts


def check(server: str, login: credentials.Login) -> str | None:
    """Ask the token endpoint (the client revokes the token again on the way out); what
    is wrong with the login, or None.

    The client and trio are loaded here: only this check talks to the network, and
    logout, beside it, must stay light.
    """
    import trio

    from tciafs.sources.base import AuthError, ClientError
    from tciafs.sources.nbia import check_login

    try:
        trio.run(check_login, server, login)
    except AuthError as exc:
        return str(exc)
    except ClientError as exc:
        return f"cannot check the login: {exc}"
    return None


def logout(mount: Path | None = None) -> int:
    """Forget the stored login, and have the caller's running mounts (or the one named)
    revoke their tokens."""
    removed = credentials.forget()
    print("tciafs: stored login removed" if removed else "tciafs: no stored login")
    for mnt in [mount] if mount else own_mounts():
        try:
            controlproto.send(mnt, "logout", "/")
            print(f"tciafs: {mnt}: token revoked; it goes on as the public guest")
        except OSError as exc:
            print(f"tciafs: {mnt}: could not log out: {exc.strerror}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "logout":
        return logout(args.mount)
    user = args.user or input("TCIA user: ").strip()
    password = getpass.getpass(f"password for {user}: ")
    login = credentials.Login(user, password, "prompt")
    problem = check(args.server or DEFAULT_SERVER, login)
    if problem is not None:
        print(f"tciafs: {problem}", file=sys.stderr)
        return 1
    path = credentials.store(login)
    print(f"tciafs: logged in as {user}; stored in {path} (mode 0600)")
    return 0
