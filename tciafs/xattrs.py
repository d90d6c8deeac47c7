"""Read-only extended attributes: what the archive says about each entry.

`user.tcia.*` carries archive facts (collection, identifier, license, DOI, cached
state, MD5 once known); `user.dicom.*` carries the main DICOM attributes of the level,
spelled as DICOM keywords. Every value comes from metadata already fetched for the
listing: reading attributes never sends a request.
"""

from __future__ import annotations

from typing import Any

from tciafs.cache import Cache
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
    if named_by_sop:  # a source's own key (IDC's object UUID) is no SOPInstanceUID
        out["user.dicom.SOPInstanceUID"] = node.ident
    md5 = cache.md5_of(node.ident)
    if md5:
        out["user.tcia.md5"] = md5
    return out


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
