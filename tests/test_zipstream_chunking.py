"""The ZIP reader hands chunks on as they came when it holds nothing back: whatever the
chunks' sizes (one for the whole stream, empty ones between, larger or smaller than the
reader's block), every entry comes out whole and checked, and an entry whose length is
known (inflated, or STORED with its sizes in the header) in blocks no larger than the
reader's."""

from __future__ import annotations

import zipfile
from collections.abc import AsyncIterator

import pytest
from test_client_zipstream import ENTRIES, METHODS, seekable_zip, streamed_zip

from tciafs.sources.nbia.zipstream import ZipStreamReader

pytestmark = pytest.mark.unit

BLOCK = 4096


async def _pieces(data: bytes, size: int, *, empty_between: bool = False
                  ) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), size):
        if empty_between:
            yield b""
        yield data[pos:pos + size]


async def _entries(chunks: AsyncIterator[bytes], *, bounded: bool
                   ) -> list[tuple[str, bytes]]:
    reader = ZipStreamReader(chunks, chunk_size=BLOCK)
    found = []
    async for member in reader:
        blocks = [block async for block in member.chunks()]
        if bounded:
            assert max(map(len, blocks), default=0) <= BLOCK
        assert member.done
        found.append((member.name, b"".join(blocks)))
    return found


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("builder", [streamed_zip, seekable_zip])
@pytest.mark.parametrize("size", [1 << 30, BLOCK, BLOCK - 1, BLOCK + 1, 100])
async def test_any_chunking_gives_the_same_entries(method: int, builder, size: int  # noqa: ANN001
                                                   ) -> None:
    data = builder(ENTRIES, method)
    # A STORED entry followed by its descriptor ends where that is found, and comes in
    # whatever blocks that search leaves: no bound there.
    bounded = method == zipfile.ZIP_DEFLATED or builder is seekable_zip
    assert await _entries(_pieces(data, size), bounded=bounded) == ENTRIES


async def test_empty_chunks_between_are_skipped() -> None:
    data = streamed_zip(ENTRIES, zipfile.ZIP_DEFLATED)
    assert await _entries(_pieces(data, 1000, empty_between=True), bounded=True) == ENTRIES
