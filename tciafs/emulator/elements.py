"""DICOM elements in Explicit VR Little Endian, and a Part-10 file's meta group.

The generator (tciafs.emulator.dicomgen) encodes the values that vary per series or per
instance here, a handful of short strings spliced between constant runs that pydicom
encoded once (tciafs.emulator.templates): microseconds an instance instead of a pydicom
write.
"""

from __future__ import annotations

import functools
import struct

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from tciafs.emulator.uids import UID_ROOT

IMPLEMENTATION_CLASS_UID = UID_ROOT + "1"
IMPLEMENTATION_VERSION = "TCIAFS_EMU_1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT",
                       "SV", "UV"})
PIXEL_DATA_TAG = 0x7FE00010
PREAMBLE = b"\0" * 128 + b"DICM"


def decimal_string(x: float) -> str:
    """A DS value as every generated file writes it: six decimals."""
    return f"{x:.6f}"


@functools.cache
def tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(keyword)


# The packers an instance's values go through, built once.
_U16, _U32 = struct.Struct("<H").pack, struct.Struct("<I").pack

#: What every element of a keyword starts with (tag and VR), whether its VR is a long
#: one, the byte that pads an odd value, and the VR.
Head = tuple[bytes, bool, bytes, str]


@functools.cache
def head_of(keyword: str) -> Head:
    """A keyword's `Head`, looked up once: an instance's header encodes the same few
    keywords again and again, and a series' listing holds them (`encode_with`)."""
    tag, vr = tag_vr(keyword)
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode())
    return head, vr in _LONG_VRS, b"\0" if vr == "UI" else b" ", vr


def element(tag: int, vr: str, payload: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), len(payload)) + payload
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(payload)) + payload


def encode_value(keyword: str, value: str | int) -> bytes:
    return encode_with(head_of(keyword), value)


def encode_with(known: Head, value: str | int) -> bytes:
    """The element of a value, its keyword's `Head` known."""
    head, long_vr, pad, vr = known
    if isinstance(value, int):
        raw = _U16(value) if vr == "US" else _U32(value)
    else:
        raw = value.encode("utf-8")  # SpecificCharacterSet is ISO_IR 192 in every template
        if len(raw) & 1:
            raw += pad
    # A long VR has two reserved bytes and a 32-bit length; the others a 16-bit one.
    return head + b"\0\0" + _U32(len(raw)) + raw if long_vr else head + _U16(len(raw)) + raw


def encoded_length(keyword: str, value: str | int) -> int:
    """Bytes `encode_value` would produce, without building them."""
    _, vr = tag_vr(keyword)
    if isinstance(value, int):
        n = 2 if vr == "US" else 4
    else:
        n = len(value.encode("utf-8"))
        n += n & 1
    return n + (12 if vr in _LONG_VRS else 8)


def encode_dataset_elements(ds: Dataset) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        out.append((int(elem.tag), fp.getvalue()))
    return out


@functools.lru_cache(maxsize=16)
def _meta_around(sop_class_uid: str) -> tuple[bytes, bytes]:
    """The file meta elements before and after MediaStorageSOPInstanceUID, the only one
    that differs between the files of a SOP class: encoded once, not once a file."""
    before = (element(0x00020001, "OB", b"\0\1")
              + encode_value("MediaStorageSOPClassUID", sop_class_uid))
    after = b"".join((encode_value("TransferSyntaxUID", EXPLICIT_VR_LE),
                      encode_value("ImplementationClassUID", IMPLEMENTATION_CLASS_UID),
                      encode_value("ImplementationVersionName", IMPLEMENTATION_VERSION)))
    return before, after


# FileMetaInformationGroupLength: its tag, VR and 16-bit length (4) before its value.
_GROUP_LENGTH_HEAD = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    before, after = _meta_around(sop_class_uid)
    rest = before + encode_value("MediaStorageSOPInstanceUID", sop_instance_uid) + after
    return _GROUP_LENGTH_HEAD + _U32(len(rest)) + rest
