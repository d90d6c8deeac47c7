"""What one of the emulator's servers speaks: NBIA (the main and the NLST server) or S3.

A service routes a request to the code that answers it and words the errors it sends
in its own way; everything else, faults, shaping, streaming and statistics, is the same
plumbing for every server (tciafs/emulator/server.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tciafs.emulator.context import Context, Request
from tciafs.emulator.faults import FaultPlan
from tciafs.emulator.wire import Reply


@dataclass(frozen=True)
class Route:
    """What answers one request, and the names the statistics and fault filters use."""

    name: str  # "getImage", "GetObject"
    qualified: str  # "v4/getImage", "s3/GetObject"
    run: Callable[[], Reply]


class Service(Protocol):
    def route(self, ctx: Context, req: Request) -> Route:
        """What answers `req` (every path but /_emulator/...)."""

    def fault_reply(self, plan: FaultPlan) -> Reply | None:
        """The reply for the injected status fault of `plan`, in the service's words;
        None leaves it to the server's default page."""

    def crash_reply(self, exc: Exception) -> Reply:
        """The reply when answering raised `exc`."""

    def control(self, ctx: Context, req: Request) -> Reply | None:
        """A /_emulator/ path of the service's own, or None for the common ones."""
