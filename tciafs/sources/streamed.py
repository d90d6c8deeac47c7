"""What every source's transport does with a streamed HTTP answer: read a small error
body, and close the answer for good, even from a task being cancelled."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import httpx
import trio


async def read_capped(response: httpx.Response, cap: int, within: float = math.inf) -> bytes:
    """Up to `cap` bytes of the body (an error document, read for its message), within
    `within` seconds: what came by then; a failure reading it is no news."""
    body = bytearray()
    with trio.move_on_after(within), contextlib.suppress(httpx.RequestError):
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= cap:
                break
    return bytes(body)


async def close(response: httpx.Response, on_closed: Callable[[int], None]) -> None:
    """Close the answer (shielded: a cancelled reader must still give the connection
    back), then call `on_closed` with the bytes it brought, whatever happened."""
    try:
        with trio.CancelScope(shield=True):
            await response.aclose()
    finally:
        on_closed(response.num_bytes_downloaded)
