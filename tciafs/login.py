"""`tciafs login` and `tciafs logout`: the stored login, checked before it is kept."""

from __future__ import annotations

import argparse
import getpass
import sys

import trio

from tciafs import controlsocket, credentials, status
from tciafs.client import AuthError, ClientError, Credentials, NbiaClient
from tciafs.mount import DEFAULT_SERVER


async def check(server: str, login: credentials.Login) -> None:
    """Ask the token endpoint; the client revokes the token again on the way out."""
    async with NbiaClient(server, api="v2", nlst_server=None,
                          credentials=Credentials(login.user, login.password)) as client:
        await client.tokens["main"].login()


def run(args: argparse.Namespace) -> int:
    if args.command == "logout":
        removed = credentials.forget()
        print("tciafs: stored login removed" if removed else "tciafs: no stored login")
        for mnt in [args.mount] if args.mount else status.mounted_tciafs():
            try:
                controlsocket.send(mnt, "logout", "/")
                print(f"tciafs: {mnt}: token revoked; it goes on as the public guest")
            except OSError as exc:
                print(f"tciafs: {mnt}: could not log out: {exc.strerror}", file=sys.stderr)
        return 0
    user = args.user or input("TCIA user: ").strip()
    password = getpass.getpass(f"password for {user}: ")
    login = credentials.Login(user, password, "prompt")
    try:
        trio.run(check, args.server or DEFAULT_SERVER, login)
    except AuthError as exc:
        print(f"tciafs: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"tciafs: cannot check the login: {exc}", file=sys.stderr)
        return 1
    path = credentials.store(login)
    print(f"tciafs: logged in as {user}; stored in {path} (mode 0600)")
    return 0
