"""Read-only extended attributes: what the archive says about each entry.

`user.tcia.*` carries archive facts (collection, identifier, license, DOI, cached
state, MD5 once known); `user.dicom.*` carries the main DICOM attributes of the level,
spelled as DICOM keywords. Every value comes from metadata already fetched for the
listing: reading attributes never sends a request.

`user.dicom.SOPInstanceUID` of a file is its name where the source names files by SOP
Instance UID (NBIA). Where it does not (IDC names them by object UUID), the UID is known
once the file is in the cache: it is read from the cached file's header, the first few
kilobytes, and remembered (an object never changes, so neither does its UID). A file not
cached has none: an attribute read never fetches, since tools read attributes of whole
trees at once (getfattr -R, rsync -X, file managers), and a request per file there
would turn a scan of metadata into one GET per file.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tciafs.cache import Cache
from tciafs.cache.store import sop_in_head
from tciafs.catalog import Kind, Node
from tciafs.controlproto import XATTR_PREFIX
from tciafs.tree import Tree

# DICOM keyword → record field, per level.
_DICOM_FIELDS: dict[Kind, dict[str, str]] = {
    Kind.PATIENT: {"PatientID": "patient_id", "PatientName": "patient_name",
                   "PatientSex": "patient_sex", "EthnicGroup": "ethnic_group",
                   "SpeciesDescription": "species_description"},
    Kind.STUDY: {"StudyInstanceUID": "study_uid", "StudyDate": "study_date",
                 "StudyDescription": "study_description", "PatientID": "patient_id"},
    Kind.SERIES: {"SeriesInstanceUID": "series_uid", "Modality": "modality",
                  "SeriesDescription": "series_description", "SeriesNumber": "series_number",
                  "BodyPartExamined": "body_part", "ImageCount": "image_count",
                  "Manufacturer": "manufacturer",
                  "ManufacturerModelName": "manufacturer_model",
                  "ProtocolName": "protocol_name", "SeriesDate": "series_date",
                  "SoftwareVersions": "software_versions", "StudyDate": "study_date",
                  "StudyDescription": "study_description", "PatientID": "patient_id",
                  "StudyInstanceUID": "study_uid"},
}
# Every attribute's name starts with one of these (user.tciafs.status at the root).
PREFIXES = (b"user.tcia.", b"user.dicom.", XATTR_PREFIX.encode())
HEADER_BYTES = 64 * 1024  # where a file's SOP Instance UID is, well past any real header
_KNOWN_SOPS: dict[str, str] = {}  # by a file's name, where the name is no SOP UID
_KNOWN_CAP = 100_000  # names remembered at most (about 20 MB): then it starts over
_LEVEL = {Kind.ROOT: "root", Kind.COLLECTION: "collection", Kind.PATIENT: "patient",
          Kind.STUDY: "study", Kind.SERIES: "series", Kind.INSTANCE: "instance",
          Kind.SIDECAR: "sidecar"}


def attributes(node: Node, tree: Tree, cache: Cache) -> dict[str, str]:
    attrs: dict[str, str] = {"user.tcia.level": _LEVEL[node.kind]}
    if node.kind in (Kind.ROOT, Kind.SIDECAR):
        return attrs
    attrs["user.tcia.id"] = node.ident
    attrs["user.tcia.collection"] = node.collection
    attrs["user.tcia.source"] = _source_of(node, tree)  # which archive the bytes come from
    attrs.update(_collection_facts(node, tree))
    for keyword, key in _DICOM_FIELDS.get(node.kind, {}).items():
        value = node.meta.get(key)
        if value is not None and value != "":
            attrs[f"user.dicom.{keyword}"] = _text(value)
    if node.kind is Kind.SERIES:
        attrs["user.tcia.cached"] = _series_state(node, tree, cache)
        if node.meta.get("file_size") is not None:
            attrs["user.tcia.series_bytes"] = str(node.meta["file_size"])
    if node.kind is Kind.INSTANCE:
        attrs.update(_instance_facts(node, cache,
                                     tree.source.capabilities.names_are_sop_uids))
    return attrs


def _source_of(node: Node, tree: Tree) -> str:
    """The source's name; per series where a source mixes archives (auto: "idc" or
    "nbia"), which it tells with no request."""
    per_series = getattr(tree.source, "source_of_series", None)
    series_uid = node.ident if node.kind is Kind.SERIES else node.series_uid
    if per_series is None or not series_uid:
        return tree.source.name
    return str(per_series(series_uid))


def _collection_facts(node: Node, tree: Tree) -> dict[str, str]:
    facts = tree.collection_facts(node.collection)
    out = {}
    for key, attr in (("license_name", "license"), ("license_uri", "license_uri"),
                      ("data_description_uri", "doi"), ("host", "server")):
        if facts.get(key):
            out[f"user.tcia.{attr}"] = str(facts[key])
    return out


def _instance_facts(node: Node, cache: Cache, named_by_sop: bool) -> dict[str, str]:
    out = {"user.dicom.SeriesInstanceUID": node.series_uid,
           "user.tcia.cached": "full" if cache.is_cached(node.ident) else "none"}
    # A source's own key (IDC's object UUID) is no SOPInstanceUID: that is in the header.
    sop = node.ident if named_by_sop else _sop_of_cached(node, cache)
    if sop is not None:
        out["user.dicom.SOPInstanceUID"] = sop
    md5 = cache.md5_of(node.ident)
    if md5:
        out["user.tcia.md5"] = md5
    return out


def _sop_of_cached(node: Node, cache: Cache) -> str | None:
    """The SOP Instance UID in the header of a cached file, else None (module docstring)."""
    known = _KNOWN_SOPS.get(node.ident)
    if known is not None:
        return known
    entry = cache.hold(node.series_uid, node.ident)  # kept from eviction while read
    if entry is None:
        return None
    try:
        with open(entry.path, "rb") as stored:
            head = stored.read(HEADER_BYTES)  # a local read of a few pages, no request
    except OSError:  # harmed from outside: the next read of the file fetches it again
        return None
    finally:
        cache.release(entry)
    with contextlib.suppress(Exception):  # pydicom raises many kinds for a bad header
        sop = sop_in_head([head])
        if sop:
            if len(_KNOWN_SOPS) >= _KNOWN_CAP:
                _KNOWN_SOPS.clear()
            _KNOWN_SOPS[node.ident] = sop
            return sop
    return None


def _series_state(node: Node, tree: Tree, cache: Cache) -> str:
    have = cache.cached_count(node.ident)
    if have == 0:
        return "none"
    total = node.meta.get("image_count") or tree.listed_count(node.ino)
    return "full" if total and have >= total else "partial"


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
