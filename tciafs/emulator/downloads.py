"""Image bodies: a series as a streamed ZIP, one instance as DICOM, with content faults.

Both the NBIA and the legacy endpoints send their images through here.  A ZIP body is
kept for replay (:class:`tciafs.emulator.zipstream.BodyCache`) unless a fault changes
what it holds: damaged images (pcorrupt) or a ZIP closed early (pshort).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tciafs.emulator import wire, zipstream
from tciafs.emulator.context import Call
from tciafs.emulator.faults import ContentFaults, damaged
from tciafs.emulator.model import InstanceRecord, SeriesRecord
from tciafs.emulator.wire import Reply

#: The content faults of the request this thread is answering; set by the server.
CONTENT_FAULTS: contextvars.ContextVar[ContentFaults | None] = contextvars.ContextVar(
    "content_faults", default=None)


def image_chunks(call: Call, uid: str, sop: str) -> Iterator[bytes]:
    chunks = call.archive.iter_instance_chunks(uid, sop)
    faults = CONTENT_FAULTS.get()
    if faults is not None and faults.strikes():
        call.ctx.stats.fault(call.ctx.host, "corrupt")
        return damaged(chunks)
    return chunks


def _instance_member(call: Call, series: SeriesRecord, name: str, inst: InstanceRecord
                     ) -> zipstream.ZipMember:
    uid, sop = series.series_instance_uid, inst.sop_instance_uid
    return zipstream.ZipMember(name, lambda: image_chunks(call, uid, sop),
                               inst.size, zipstream.zip_time(series.max_submission_timestamp))


def hash_order(name: str) -> int:
    """Java ``String.hashCode`` spread as HashMap does: a stable, unordered-looking key."""
    h = 0
    for ch in name:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0xF


def md5_table(named: Sequence[tuple[str, InstanceRecord]]) -> bytes:
    # Java HashMap order: deterministic here, but deliberately not the file order.
    rows = sorted(((n, i.md5) for n, i in named), key=lambda r: hash_order(r[0]))
    return wire.md5_csv(rows)


@dataclass(frozen=True)
class SeriesZip:
    """What one series' ZIP holds, in order: a LICENSE, the images, the MD5 list."""

    series: SeriesRecord
    named: Sequence[tuple[str, InstanceRecord]]  # (member name, instance) in ZIP order
    license: str | None = None
    md5: bool = False

    def members(self, call: Call, images: int | None = None) -> Iterator[zipstream.ZipMember]:
        """Every member, or with `images` only the first that many images and nothing
        after them: NBIA closes the ZIP where writing an image failed."""
        when = self.series.max_submission_timestamp
        if self.license is not None:
            yield zipstream.bytes_member("LICENSE", self.license.encode(), when)
        for name, inst in self.named[:images]:
            yield _instance_member(call, self.series, name, inst)
        if self.md5 and images is None:
            yield zipstream.bytes_member("md5hashes.csv", md5_table(self.named), when)


def zip_reply(call: Call, content: SeriesZip, *flavour: object) -> Reply:
    """A series as a ZIP; `flavour` names what, beside the series, shapes the body."""
    series = content.series
    disposition = f'attachment; filename="{series.series_instance_uid}.zip"'
    # A series re-submitted to the archive is another body: its submission time moved.
    key = (call.api, series.series_instance_uid, series.max_submission_timestamp, *flavour)
    return Reply(200, content_type="application/octet-stream",
                 headers=[("Content-Disposition", disposition)],
                 stream=lambda sink: _write_zip(call, key, content, sink),
                 size_hint=series.file_size // 2)


def _write_zip(call: Call, key: tuple[object, ...], content: SeriesZip,
               sink: wire.Sink) -> None:
    faults = CONTENT_FAULTS.get()
    if faults is None or not faults.possible:
        call.ctx.bodies.write(key, lambda: content.members(call), sink)
        return
    # A faulted body is neither kept nor replayed.
    kept = faults.images_kept(len(content.named))
    if kept is not None:
        call.ctx.stats.fault(call.ctx.host, "short")
    zipstream.write_zip(content.members(call, kept), sink)


def dicom_reply(call: Call, uid: str, inst: InstanceRecord, disposition: str) -> Reply:
    def stream(sink: wire.Sink) -> None:
        for chunk in image_chunks(call, uid, inst.sop_instance_uid):
            sink(chunk)

    return Reply(200, content_type="application/dicom",
                 headers=[("Content-Disposition", disposition)], stream=stream,
                 length=inst.size, size_hint=inst.size)
