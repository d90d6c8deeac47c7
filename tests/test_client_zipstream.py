"""The streaming ZIP reader: data descriptors, random chunking, truncation, corruption."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator

import pytest

from tciafs.sources.base import ChecksumMismatch, MalformedResponse, TruncatedStream
from tciafs.sources.nbia.zipstream import ZipStreamReader, parse_md5_csv

pytestmark = pytest.mark.unit

ENTRIES = [
    ("LICENSE", b"License Information. The X collection is distributed under CC BY 4.0."),
    ("00000001.dcm", os.urandom(70_000)),  # incompressible
    ("00000002.dcm", b"\x00" * 200_000 + b"DICM" * 1000),  # very compressible
    ("00000003.dcm", b""),
    # Bytes that look like ZIP records must not end a STORED entry early. (At offset 0
    # they would be a valid descriptor of an empty entry; DICOM starts with a preamble.)
    ("00000004.dcm", b"DICM" + b"PK\x07\x08" + b"\x00" * 12 + b"PK\x03\x04" + os.urandom(3000)
     + b"PK\x07\x08" + struct.pack("<III", 0, 3020, 3020) + b"PK\x01\x02"),
    ("md5hashes.csv", b"Filename,MD5Hash\n"),
]


class _Unseekable(io.RawIOBase):
    """Like an HTTP body being written: zipfile must use data descriptors."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001 - io signature
        self.data += b
        return len(b)


def streamed_zip(entries: list[tuple[str, bytes]], method: int, *,
                 force_zip64: bool = False) -> bytes:
    out = _Unseekable()
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, data in entries:
            with zf.open(name, "w", force_zip64=force_zip64) as member:
                member.write(data)
    return bytes(out.data)


def seekable_zip(entries: list[tuple[str, bytes]], method: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


def unsigned_descriptor_zip(entries: list[tuple[str, bytes]], method: int) -> bytes:
    """A ZIP whose data descriptors have no signature (allowed, and written by some tools)."""
    out, central = bytearray(), bytearray()
    for name, data in entries:
        raw = name.encode()
        if method == zipfile.ZIP_DEFLATED:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = packer.compress(data) + packer.flush()
        else:
            payload = data
        crc, offset = zlib.crc32(data), len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x08, method, 0, 0, 0, 0, 0,
                           len(raw), 0) + raw + payload
        out += struct.pack("<III", crc, len(payload), len(data))
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x08, method, 0, 0,
                               crc, len(payload), len(data), len(raw), 0, 0, 0, 0, 0,
                               offset) + raw
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries),
                       len(central), len(out), 0)
    return bytes(out + central + eocd)


async def chunked(data: bytes, seed: int, largest: int = 5000) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 7, 64, rng.randint(1, largest)))
        yield data[pos:pos + size]
        pos += size


async def read_all(data: bytes, seed: int = 0, **kwargs: object) -> list[tuple[str, bytes]]:
    reader = ZipStreamReader(chunked(data, seed), chunk_size=4096, **kwargs)  # type: ignore[arg-type]
    result = []
    async for member in reader:
        body = b"".join([chunk async for chunk in member.chunks()])
        assert member.done and member.size == len(body)
        assert member.md5 == hashlib.md5(body).hexdigest()
        result.append((member.name, body))
    return result


METHODS = [pytest.param(zipfile.ZIP_DEFLATED, id="deflate"),
           pytest.param(zipfile.ZIP_STORED, id="stored")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_streamed_zip_with_signed_descriptors(method: int, seed: int) -> None:
    data = streamed_zip(ENTRIES, method)
    assert struct.unpack_from("<H", data, 6)[0] & 0x08  # really uses data descriptors
    assert await read_all(data, seed) == ENTRIES


@pytest.mark.parametrize("method", METHODS)
async def test_unsigned_descriptors(method: int) -> None:
    assert await read_all(unsigned_descriptor_zip(ENTRIES, method), seed=5) == ENTRIES


@pytest.mark.parametrize("method", METHODS)
async def test_sizes_in_local_headers(method: int) -> None:
    assert await read_all(seekable_zip(ENTRIES, method), seed=9) == ENTRIES


async def test_zip64_descriptors() -> None:
    data = streamed_zip(ENTRIES[:3], zipfile.ZIP_DEFLATED, force_zip64=True)
    assert await read_all(data, seed=4) == ENTRIES[:3]


async def test_chunks_stay_small_for_a_huge_compressible_entry() -> None:
    data = streamed_zip([("big.dcm", b"\x00" * (32 * 1024 * 1024))], zipfile.ZIP_DEFLATED)
    assert len(data) < 100_000
    reader = ZipStreamReader(chunked(data, 0, largest=65536), chunk_size=65536)
    member = await reader.next_member()
    assert member is not None
    total = 0
    async for chunk in member.chunks():
        assert len(chunk) <= 65536
        total += len(chunk)
    assert total == 32 * 1024 * 1024
    assert await reader.next_member() is None


async def test_unread_members_are_skipped_and_checked() -> None:
    data = streamed_zip(ENTRIES, zipfile.ZIP_DEFLATED)
    reader = ZipStreamReader(chunked(data, 3), chunk_size=4096)
    names = []
    while (member := await reader.next_member()) is not None:
        names.append(member.name)  # never read: the reader must skip it
    assert names == [name for name, _ in ENTRIES]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("builder", [streamed_zip, unsigned_descriptor_zip, seekable_zip])
async def test_cut_anywhere_is_truncated(method: int, builder) -> None:  # noqa: ANN001
    entries = [("LICENSE", b"license"), ("a.dcm", os.urandom(3000)),
               ("b.dcm", b"\x01" * 5000), ("md5hashes.csv", b"Filename,MD5Hash\n")]
    data = builder(entries, method)
    for cut in [*range(0, len(data), 37), len(data) - 1]:
        with pytest.raises(TruncatedStream):
            await read_all(data[:cut], seed=cut)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("builder", [streamed_zip, seekable_zip])
async def test_flipped_data_byte_is_caught(method: int, builder) -> None:  # noqa: ANN001
    entries = [("a.dcm", os.urandom(5000)), ("b.dcm", b"x")]
    data = bytearray(builder(entries, method))
    header = 30 + len("a.dcm")
    data[header + 2500] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="'a.dcm'"):
        await read_all(bytes(data))


async def test_corrupt_deflate_stream_is_an_error() -> None:
    text = b"".join(b"(0020,0013) IS %d\n" % i for i in range(3000))
    clean = seekable_zip([("a.dcm", text)], zipfile.ZIP_DEFLATED)
    compressed = struct.unpack_from("<I", clean, 18)[0]
    for offset in range(40, 30 + 5 + compressed, 97):
        data = bytearray(clean)
        data[offset] ^= 0x55
        # Whatever the damage does to the inflater, it must end in an error, never in
        # bytes handed over as good.
        with pytest.raises((ChecksumMismatch, TruncatedStream, MalformedResponse)):
            await read_all(bytes(data))


async def test_wrong_crc_in_descriptor_is_caught() -> None:
    data = bytearray(streamed_zip([("a.dcm", os.urandom(2000))], zipfile.ZIP_DEFLATED))
    descriptor = data.find(b"PK\x07\x08")
    data[descriptor + 4] ^= 0x01
    with pytest.raises(ChecksumMismatch, match="CRC-32 mismatch in entry 'a.dcm'"):
        await read_all(bytes(data))


async def test_wrong_size_in_descriptor_is_caught() -> None:
    data = bytearray(streamed_zip([("a.dcm", os.urandom(2000))], zipfile.ZIP_DEFLATED))
    descriptor = data.find(b"PK\x07\x08")
    data[descriptor + 12] ^= 0x01  # uncompressed size
    with pytest.raises(ChecksumMismatch, match="size mismatch"):
        await read_all(bytes(data))


async def test_not_a_zip() -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head></html>"
    with pytest.raises(MalformedResponse, match="not a ZIP"):
        await read_all(html)
    with pytest.raises(TruncatedStream):
        await read_all(b"")


async def test_trailer_must_list_what_was_streamed() -> None:
    data = bytearray(streamed_zip(ENTRIES[:2], zipfile.ZIP_DEFLATED))
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 5, 5)  # claim five entries
    with pytest.raises(TruncatedStream, match="lists 5 entries"):
        await read_all(bytes(data))


def test_md5_csv() -> None:
    digest = hashlib.md5(b"x").hexdigest()
    text = f"Filename,MD5Hash\n00000002.dcm,{digest.upper()}\n00000001.dcm,{digest}\n"
    assert parse_md5_csv(text.encode()) == {"00000001.dcm": digest, "00000002.dcm": digest}
    assert parse_md5_csv(b"Filename,MD5Hash\n") == {}
    with pytest.raises(MalformedResponse, match="header"):
        parse_md5_csv(b"name,hash\na,b\n")
    with pytest.raises(MalformedResponse, match="line 2"):
        parse_md5_csv(b"Filename,MD5Hash\n00000001.dcm,nothex\n")
