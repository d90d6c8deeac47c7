"""The catalog's cheap looks at a listing (counted up to a bound, identifiers only) and
the lookup table's one-byte counts, which a walk asks of every entry it is served."""

from __future__ import annotations

from pathlib import Path

import pytest

from tciafs.catalog import ROOT_INODE, Catalog, Kind, NewChild
from tciafs.inodes import KernelInodes

pytestmark = pytest.mark.unit


def _collection(tmp_path: Path, patients: int) -> tuple[Catalog, int]:
    catalog = Catalog(tmp_path / "catalog.sqlite", "test")
    catalog.replace_children(ROOT_INODE, [NewChild("C", Kind.COLLECTION, "C", "C")])
    coll = catalog.child(ROOT_INODE, "C")
    assert coll is not None
    children = [NewChild(f"P{i:03d}", Kind.PATIENT, f"P{i:03d}", "C") for i in range(patients)]
    children.append(NewChild(".LICENSE", Kind.SIDECAR, ".LICENSE", "C"))
    catalog.replace_children(coll.ino, children)
    return catalog, coll.ino


def test_children_are_counted_by_kind_up_to_a_bound(tmp_path: Path) -> None:
    catalog, coll = _collection(tmp_path, 40)
    assert catalog.count_children(coll, Kind.PATIENT, 1000) == 40
    assert catalog.count_children(coll, Kind.PATIENT, 11) == 11
    assert catalog.count_children(coll, Kind.SIDECAR, 1000) == 1
    assert catalog.count_children(ROOT_INODE, Kind.ROOT, 10) == 0  # the root is no child


def test_idents_name_the_children_of_a_kind(tmp_path: Path) -> None:
    catalog, coll = _collection(tmp_path, 3)
    by_ident = {ident: ino for ino, ident in catalog.idents(coll, Kind.PATIENT)}
    assert sorted(by_ident) == ["P000", "P001", "P002"]
    assert all(catalog.get(ino).ident == ident  # type: ignore[union-attr]
               for ident, ino in by_ident.items())


def test_lookup_counts_added_one_by_one_pass_into_the_overflow_and_back() -> None:
    table = KernelInodes()
    table.add(300)  # grows the table
    table.mark_provisional(7)
    for _ in range(130):  # readdirplus adds one at a time, across the byte's bound
        table.add(7)
    assert table[7] == 130 and table[300] == 1
    assert not table.drop(7, 125) and table[7] == 5
    table.add(7, 2)
    assert table[7] == 7
    assert table.take_provisional(7)  # the flag outlived the count's trips
    assert table.drop(7, 7) and 7 not in table
