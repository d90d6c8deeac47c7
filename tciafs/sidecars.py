"""Small generated files beside the images, built from metadata already listed.

- `<collection>/.LICENSE`: the collection's license, as the service states it in its
  ZIPs, so that the data usage policy travels with copies;
- `<collection>/.CITATION`: how to cite the collection (its DOI) and its archive;
- `<series>/.series.json`: the series' metadata record.
"""

from __future__ import annotations

import json

from tciafs.catalog import Kind, Node
from tciafs.tree import SERIES_SIDECAR, Tree


async def render(node: Node, tree: Tree) -> bytes:
    if node.name == SERIES_SIDECAR:
        return _series_json(node, tree)
    facts = await tree.ensure_collection_facts(node.collection)
    if node.name == ".LICENSE":
        return _license(node.collection, facts)
    return _citation(node.collection, facts)


def _license(collection: str, facts: dict) -> bytes:
    name = facts.get("license_name") or "Not Specified"
    uri = facts.get("license_uri") or "Not Specified"
    return (f"License Information. The {collection} collection is distributed under the "
            f"{name} at {uri} By downloading the data, you agree to abide by terms of "
            "this license.\n").encode()


def _citation(collection: str, facts: dict) -> bytes:
    doi = facts.get("data_description_uri")
    lines = [f"Data from the {collection} collection, {facts.get('archive') or 'the archive'}."]
    if doi:
        lines.append(f"Cite the data set as: {doi}")
    if facts.get("archive_citation"):  # how the source asks to be cited
        lines.append(facts["archive_citation"])
    return ("\n".join(lines) + "\n").encode()


def _series_json(node: Node, tree: Tree) -> bytes:
    series = tree.node(node.parent)
    meta = dict(series.meta) if series is not None and series.kind is Kind.SERIES else {}
    return (json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
