"""Headers fetched ahead of a header scan, and the lane IDC gives them.

Against the emulator's S3 side on loopback, through an httpx transport that passes every
request on to it and counts what is on the wire (requests sent and not yet closed), by
lane: a scan read file by file asks each header once, a guess rides its own lane and no
more of them are in flight than that lane holds, and a reader's request goes through
while the guesses' lane is full. Counts, never times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio
import trio.testing
from cacheutil import _with_cache
from test_cache_blocks import ct, sent  # the same series and byte counter
from test_idc_source import CATALOG, idc_emulator, reset, s3_url

from tciafs.cache import Cache
from tciafs.cache.blocks import FIRST, HEADERS_AHEAD, HEADERS_SCAN_AT_ONCE
from tciafs.emulator import launch
from tciafs.sources import build, lanes
from tciafs.sources.base import Series
from tciafs.sources.idc import IdcSource
from tciafs.sources.idc.http import AHEAD_CONNECTIONS, Request, Transport

__all__ = ["ct", "idc_emulator"]  # fixtures: used by name

DEFAULT_TIER = "handler"


class Wire(httpx.AsyncBaseTransport):
    """Passes requests on; counts them by lane (guess or reader) while they are open."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.open: Counter[bool] = Counter()  # lane → requests open now
        self.most: Counter[bool] = Counter()  # lane → most open at once
        self.sent: Counter[tuple[bool, str, str]] = Counter()  # (lane, path, range) → GETs

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lane = lanes.guessing()
        self.sent[(lane, request.url.path, request.headers.get("range", ""))] += 1
        self.open[lane] += 1
        self.most[lane] = max(self.most[lane], self.open[lane])
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            self.open[lane] -= 1
            raise
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_Closing(response, lambda: self._closed(lane)),
                              extensions=response.extensions)

    def _closed(self, lane: bool) -> None:
        self.open[lane] -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Closing(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response, closed: object) -> None:
        self.response = response
        self.closed = closed
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.closed()  # type: ignore[operator]
        await self.response.aclose()


def counted_source(emu: launch.EmulatorProcess, wire: Wire) -> IdcSource:
    source = build("idc", endpoint=s3_url(emu), catalog=s3_url(emu) + CATALOG, timeout=10,
                   transport=wire)
    assert isinstance(source, IdcSource)
    return source


async def test_a_header_scan_asks_each_header_once_on_the_guesses_lane(
        idc_emulator: launch.EmulatorProcess, ct: tuple[Series, dict[str, bytes]],
        tmp_path: Path) -> None:
    series, truth = ct
    names = sorted(truth)
    wire = Wire()
    source = counted_source(idc_emulator, wire)
    cache = Cache(tmp_path / "c", 1 << 30, source, prefetch=False)
    reset(idc_emulator)

    async def body() -> None:
        for i, name in enumerate(names):  # pydicom's scan: block 0 of each file in turn
            following = [(n, len(truth[n])) for n in names[i + 1:i + 1 + HEADERS_AHEAD]]
            entry = cache.acquire_blocks(series.collection, series.series_uid, name,
                                         len(truth[name]), following)
            assert entry is not None
            assert await cache.read_blocks(entry, 0, 8192) == truth[name][:8192]
            cache.release(entry)
        with trio.fail_after(30):
            while cache.blocks._fetching or cache.blocks._workers:
                await trio.sleep(0.01)

    async with source:
        await _with_cache(cache, body)
    cache.close()
    assert cache.blocks.present == {n: {0} for n in names}
    asked = Counter(path for (_, path, _), count in wire.sent.items() for _ in range(count))
    assert len(asked) == len(names) and set(asked.values()) == {1}  # each header once
    assert {rng for (_, _, rng) in wire.sent} == {f"bytes=0-{FIRST - 1}"}
    assert sent(idc_emulator) == len(names) * FIRST
    guessed = sum(n for (lane, _, _), n in wire.sent.items() if lane)
    assert guessed >= 1  # the first file's read let the next ones start
    assert wire.most[True] <= HEADERS_SCAN_AT_ONCE <= AHEAD_CONNECTIONS
    assert wire.most[False] <= 1  # the reader's own: one file at a time


async def test_a_reader_goes_past_a_full_lane_of_guesses(
        idc_emulator: launch.EmulatorProcess, ct: tuple[Series, dict[str, bytes]]) -> None:
    series, truth = ct
    source = counted_source(idc_emulator, Wire())
    place = source.catalog.place(series.series_uid)
    assert place is not None
    wire = Wire()
    http = Transport(max_connections=1, ahead_connections=2, timeout=10, transport=wire)
    name = sorted(truth)[0]
    url = f"{s3_url(idc_emulator)}/{place.bucket}/{place.prefix}{name}.dcm"

    def get() -> Request:
        return Request("GET", url, "GetObject", f"GET {name}", headers={"range": "bytes=0-9"})

    late: list[int] = []

    async def third_guess() -> None:
        with lanes.ahead():
            opened = await http.open(get())
            late.append(opened.status)
            await opened.aclose()

    async with trio.open_nursery() as nursery:
        with lanes.ahead():  # two guesses hold the lane, their bodies unread
            held = [await http.open(get()) for _ in range(2)]
        nursery.start_soon(third_guess)
        await trio.testing.wait_all_tasks_blocked()
        status, _, data = await http.fetch(get())  # the reader's own: not behind them
        assert (status, data) == (206, truth[name][:10])
        assert wire.open[True] == 2 and not late  # the third guess waits for the lane
        assert sum(n for (lane, _, _), n in wire.sent.items() if lane) == 2
        for opened in held:
            await opened.aclose()
    assert late == [206] and wire.most[True] == 2 and wire.most[False] == 1
    await http.aclose()
