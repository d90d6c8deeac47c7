"""The bytes of IDC objects as the cache reads them: one checked object, or a whole series
as parallel object GETs behind the series-stream protocol of tciafs.sources.base.

What an IDC object is checked against (docs/auto.md, "Checks"): its exact size from the
bucket listing, and its ETag where the ETag is an MD5 (an object stored in one piece).
The cache then checks that the header names the instance asked for. NBIA's MD5s are
never held against IDC's bytes: IDC's copy of a file need not be byte for byte NBIA's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import trio

from tciafs.sources.base import ChecksumMismatch, ClientError, InstanceStream

from .mapping import MappedObject

INLINE_OVER = 16 << 20  # objects larger than this stream through, never wait in memory
AHEAD_BYTES = 64 << 20  # at most this much of a series waits in memory for the cache


def etag_md5(obj: MappedObject) -> str | None:
    """The object's MD5 where its ETag is one (stored in one piece, not in parts)."""
    etag = obj.etag
    if etag and len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return etag
    return None


class ObjectCheck:
    """Counts and hashes an object's bytes as they pass; check() at the end."""

    def __init__(self, obj: MappedObject) -> None:
        self.obj = obj
        self.size = 0
        self._md5 = hashlib.md5()

    def take(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        self._md5.update(chunk)
        return chunk

    def check(self) -> str:
        """The bytes' MD5; ChecksumMismatch when they are not the listed object."""
        got = self._md5.hexdigest()
        if self.size != self.obj.size:
            raise ChecksumMismatch(f"object {self.obj.key}: {self.size} bytes, the listing "
                                   f"gives {self.obj.size}")
        want = etag_md5(self.obj)
        if want is not None and got != want:
            raise ChecksumMismatch(f"object {self.obj.key}: MD5 {got}, its ETag {want}")
        return got


class CheckedObject:
    """An InstanceStream over one IDC GET, checked against the listing as it ends.
    `on_failure` learns of bytes that came short or wrong, before the error goes up."""

    def __init__(self, inner: InstanceStream, obj: MappedObject,
                 on_failure: Callable[[MappedObject, Exception], None]) -> None:
        self._inner = inner
        self.obj = obj
        self._on_failure = on_failure

    @property
    def size(self) -> int | None:
        return self.obj.size

    async def chunks(self) -> AsyncIterator[bytes]:
        check = ObjectCheck(self.obj)
        try:
            async for chunk in self._inner.chunks():
                yield check.take(chunk)
            check.check()
        except ClientError as exc:
            self._on_failure(self.obj, exc)
            raise


class HeldObject:
    """An InstanceStream over bytes already read and checked."""

    def __init__(self, data: list[bytes], size: int) -> None:
        self._data = data
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._data:
            yield chunk


@dataclass
class Member:
    """One file of a series stream: its bytes, whole in memory or streamed."""

    name: str
    _chunks: Callable[[], AsyncIterator[bytes]]

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks()


@dataclass(eq=False)  # a borrower of the limiter: hashed by identity
class _Fetched:
    """An object fetched ahead of the reader: its bytes, or why there are none."""

    obj: MappedObject
    done: trio.Event = field(default_factory=trio.Event)
    data: list[bytes] = field(default_factory=list)
    md5: str | None = None
    error: ClientError | None = None
    inline: bool = False  # too large to wait in memory: the reader streams it itself


class _ByteBudget:
    """Bytes that may wait in memory; one taker (the feeder), many givers."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self._given = trio.Event()

    async def take(self, wanted: int) -> int:
        wanted = min(wanted, self.total)
        while self.free < wanted:
            await self._given.wait()
            self._given = trio.Event()
        self.free -= wanted
        return wanted

    def give(self, amount: int) -> None:
        self.free += amount
        self._given.set()


Opener = Callable[[MappedObject], Awaitable[tuple[list[bytes], str]]]
Streamer = Callable[[MappedObject], AsyncIterator[bytes]]
NbiaMember = Callable[[str], Awaitable[tuple[Member, Callable[[], Awaitable[str]]]]]


class IdcSeriesStream:
    """A series as parallel GETs of its objects, handed to the reader one at a time.

    `objects` yields the series' objects as they become known (at once, in NBIA's
    order, where the map holds them; as the pass that maps them finds them otherwise);
    `listed` is what NBIA lists. Each instance listed comes once: from its object, or,
    after the others, from NBIA where IDC lacks it or its object cannot be fetched or
    fails its checks. A reader gets every instance either way. Up to `parallel` GETs
    run at once, and at most AHEAD_BYTES wait in memory; larger objects stream through
    when their turn comes.
    Workers never wait on the reader, so they never hold a connection the reader needs.
    """

    def __init__(self, objects: AsyncIterator[MappedObject], listed: list[str], *,
                 fetch: Opener, stream: Streamer, nbia_member: NbiaMember, parallel: int,
                 nursery: trio.Nursery,
                 on_failure: Callable[[MappedObject, Exception], None]) -> None:
        self.objects = objects
        self.listed = listed
        self._wanted = set(listed)
        self._delivered: set[str] = set()
        self._queued: set[str] = set()
        self._fetch = fetch
        self._stream = stream
        self._nbia_member = nbia_member
        self._limiter = trio.CapacityLimiter(max(1, parallel))
        self._budget = _ByteBudget(AHEAD_BYTES)
        self._nursery = nursery
        self._on_failure = on_failure
        self._md5s: dict[str, str] = {}
        self.from_shared_cache = False  # no site cache stands in front of the buckets

    @property
    def md5s(self) -> dict[str, str]:
        return self._md5s

    async def members(self) -> AsyncIterator[Member]:
        # Unbounded: the feeder is held back by the byte budget and the GETs at once.
        send, queue = trio.open_memory_channel[_Fetched](math.inf)
        self._nursery.start_soon(self._feed, send)
        async with queue:
            async for fetched in queue:
                member = await self._member_of(fetched)
                if member is not None:
                    self._delivered.add(member.name)
                    yield member
        for sop in [sop for sop in self.listed if sop not in self._delivered]:
            member, md5 = await self._nbia_member(sop)
            yield member
            self._md5s[sop] = await md5()

    async def _member_of(self, fetched: _Fetched) -> Member | None:
        """The member of a fetched object; None when it failed (NBIA's copy then comes
        after the others)."""
        if fetched.inline:
            return Member(fetched.obj.sop, lambda: self._streamed(fetched.obj))
        await fetched.done.wait()
        if fetched.error is not None:
            self._on_failure(fetched.obj, fetched.error)
            self._budget.give(fetched.obj.size)
            return None
        assert fetched.md5 is not None
        self._md5s[fetched.obj.sop] = fetched.md5
        return Member(fetched.obj.sop, lambda: self._held(fetched))

    async def _held(self, fetched: _Fetched) -> AsyncIterator[bytes]:
        data, fetched.data = fetched.data, []
        try:
            for chunk in data:
                yield chunk
        finally:
            self._budget.give(fetched.obj.size)

    async def _streamed(self, obj: MappedObject) -> AsyncIterator[bytes]:
        check = ObjectCheck(obj)
        try:
            async for chunk in self._stream(obj):
                yield check.take(chunk)
            self._md5s[obj.sop] = check.check()
        except ClientError as exc:
            self._on_failure(obj, exc)  # the next attempt takes it from NBIA
            raise

    async def _feed(self, send: trio.MemorySendChannel[_Fetched]) -> None:
        async with send:
            async for obj in self.objects:
                if obj.sop not in self._wanted or obj.sop in self._queued:
                    continue  # not what NBIA lists now, or a second copy
                self._queued.add(obj.sop)
                fetched = _Fetched(obj, inline=obj.size > INLINE_OVER)
                if not fetched.inline:
                    await self._budget.take(obj.size)
                    await self._limiter.acquire_on_behalf_of(fetched)
                    self._nursery.start_soon(self._fetch_ahead, fetched)
                await send.send(fetched)

    async def _fetch_ahead(self, fetched: _Fetched) -> None:
        try:
            fetched.data, fetched.md5 = await self._fetch(fetched.obj)
        except ClientError as exc:
            fetched.error = exc
        finally:
            self._limiter.release_on_behalf_of(fetched)
            fetched.done.set()
