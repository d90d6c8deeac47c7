"""Asking the service at mount time: the start-up probe, and the selection a manifest or
cart stands for.

A mount whose catalog holds a tree to serve is ready at once and probes the service in
the background (ServiceProbe): a server that is down costs its readers nothing they
could have had from the cache, not the transport's whole back-off (9 s) before the mount
answers at all. Only a mount with nothing stored waits for the probe, which then decides
whether it can mount.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tciafs import manifest
from tciafs.catalog import Catalog
from tciafs.mounts import MountError
from tciafs.sources.base import (
    AuthError,
    ClientError,
    MalformedResponse,
    Series,
    ServerError,
    Source,
)

log = logging.getLogger(__name__)

PROBING, ONLINE, OFFLINE = "probing", "online", "offline"
DOWN_PAUSE = 60.0  # found down: stored listings are served as they are this long


async def probe(client: Source, server: str) -> ClientError | None:
    """Log in and ask the service for its collections; the error if it cannot be reached
    or does not answer like NBIA, which a cache that holds listings can live with."""
    try:
        await client.start()
    except AuthError as exc:
        raise MountError(str(exc)) from exc
    except (ServerError, MalformedResponse) as exc:
        return exc
    except Exception as exc:  # the client's errors carry the one-line reason
        raise MountError(f"cannot reach {server}: {exc}") from exc
    return None


async def selection_of(client: Source, manifest_path: Path | None, cart: str | None,
                       server: str) -> list[Series] | None:
    """The series a manifest or a shared cart names, or None for the whole archive."""
    if manifest_path is not None:
        try:
            uids = manifest.read(manifest_path)
        except manifest.ManifestError as exc:
            raise MountError(str(exc)) from None
        chosen = await manifest.resolve(client, uids)
        what = f"manifest {manifest_path}"
    elif cart is not None:
        chosen = await client.cart(cart)
        what = f"shared cart {cart!r}"
    else:
        return None
    if not chosen:
        raise MountError(f"{what}: none of its series is known to {server}")
    log.info("%s: %d series", what, len(chosen))
    return chosen


async def online_selection(client: Source, manifest_path: Path | None, cart: str | None,
                           server: str, catalog: Catalog) -> list[Series] | None:
    try:
        selection = await selection_of(client, manifest_path, cart, server)
    except ClientError as exc:
        raise MountError(f"cannot read the selection: {exc}") from exc
    catalog.save_selection(selection)
    return selection


def stored_tree(catalog: Catalog, selective: bool) -> tuple[bool, list[Series] | None]:
    """Whether the catalog holds a tree a mount can serve without the service, and the
    selection it stands for: a manifest's or cart's series as last resolved, or the whole
    archive's stored listings."""
    if selective:
        selection = catalog.stored_selection()
        return selection is not None, selection
    return catalog.has_listings(), None


class ServiceProbe:
    """The start-up probe of a mount that serves its stored tree meanwhile.

    While it runs, stored listings are served as they are (the tree is told the service
    is down); once the service answers they are refreshed as usual, and a selection is
    resolved again; when it cannot be reached, the mount goes on offline.
    """

    def __init__(self, client: Source, server: str, *,
                 on_down: Callable[[float | None], None],
                 on_up: Callable[[], None],
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.server = server
        self.state = PROBING
        self.offline: str | None = None  # why, once found offline
        self.on_down = on_down
        self.on_up = on_up
        self.refresh = refresh  # what to ask again once the service answers
        self.answered = trio.Event()  # the probe ended, either way

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self.on_down(None)  # until the probe ends
        task_status.started()
        unreachable: Exception | None
        try:
            unreachable = await probe(self.client, self.server)
            if unreachable is None and self.refresh is not None:
                await self.refresh()
        except (MountError, ClientError) as exc:  # mounted already: refusing now would
            unreachable = exc  # only hide the cache from its readers
        if unreachable is None:
            self.state = ONLINE
            self.on_up()
            log.info("%s answers", self.server)
        else:
            self.state = OFFLINE
            self.offline = (f"offline: cannot reach {self.server} ({unreachable}); serving the "
                            "listings and files this cache holds until it answers")
            log.warning("%s", self.offline)
            self.on_down(DOWN_PAUSE)
        self.answered.set()

    async def outcome(self, within: float) -> str | None:
        """What a mount announces as ready: the offline note if the probe found the
        service down within `within` seconds; that it is still probing if it did not end."""
        with trio.move_on_after(within):
            await self.answered.wait()
        if not self.answered.is_set():
            return (f"probing {self.server} in the background; serving the listings and "
                    "files this cache holds meanwhile")
        return self.offline
