import datetime
from pathlib import Path

import pytest

from tciafs.catalog import ROOT_INODE, Catalog, Kind, NewChild
from tciafs.sources.base import Series

pytestmark = pytest.mark.unit


def _kids(*idents: str) -> list[NewChild]:
    return [NewChild(i, Kind.COLLECTION, i, i) for i in idents]


def test_inodes_are_stable_across_reopen_and_relisting(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", "src")
    cat.replace_children(ROOT_INODE, _kids("A", "B"))
    before = {n.name: n.ino for n in cat.children(ROOT_INODE)}
    cat.replace_children(ROOT_INODE, _kids("B", "A", "C"))
    after = {n.name: n.ino for n in cat.children(ROOT_INODE)}
    assert after["A"] == before["A"] and after["B"] == before["B"]
    cat.close()
    again = Catalog(tmp_path / "c.sqlite", "src")
    assert {n.name: n.ino for n in again.children(ROOT_INODE)} == after
    assert again.get(ROOT_INODE).listed is not None


def test_vanished_entries_take_their_subtree_with_them(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", "src")
    cat.replace_children(ROOT_INODE, _kids("A", "B"))
    a = next(n for n in cat.children(ROOT_INODE) if n.name == "A")
    cat.replace_children(a.ino, [NewChild("p", Kind.PATIENT, "p", "A")])
    cat.replace_children(ROOT_INODE, _kids("B"))
    assert [n.name for n in cat.children(ROOT_INODE)] == ["B"]
    assert cat.count() == 2  # root and B
    # What statfs reports as inodes: cheap, and never fewer than the entries.
    (b,) = cat.children(ROOT_INODE)
    assert cat.highest_inode() == b.ino > cat.count()


def test_another_source_starts_afresh(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", "one")
    cat.replace_children(ROOT_INODE, _kids("A"))
    cat.close()
    other = Catalog(tmp_path / "c.sqlite", "two")
    assert other.children(ROOT_INODE) == []
    assert other.get(ROOT_INODE).kind is Kind.ROOT


def test_catalog_file_is_private(tmp_path: Path) -> None:
    Catalog(tmp_path / "sub" / "c.sqlite", "src")
    assert (tmp_path / "sub" / "c.sqlite").stat().st_mode & 0o077 == 0
    assert (tmp_path / "sub").stat().st_mode & 0o077 == 0


def test_inodes_of_removed_entries_are_never_handed_out_again(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", "src")
    cat.replace_children(ROOT_INODE, _kids("A", "B"))
    gone = max(n.ino for n in cat.children(ROOT_INODE))
    cat.replace_children(ROOT_INODE, _kids("A"))
    cat.replace_children(ROOT_INODE, _kids("A", "C"))
    assert all(n.ino != gone for n in cat.children(ROOT_INODE))
    assert max(n.ino for n in cat.children(ROOT_INODE)) > gone


def test_a_selection_is_kept_for_a_start_without_the_service(tmp_path: Path) -> None:
    chosen = [Series("C", "P/1", "1.2.3", "1.2.3.4", modality="CT", series_number=2.0,
                     image_count=3, file_size=1536, study_date=datetime.date(2001, 2, 3),
                     submission_date=datetime.date(2024, 5, 6)),
              Series("C", "P 2", "1.2.5", "1.2.5.6")]
    path = tmp_path / "c.sqlite"
    catalog = Catalog(path, "server|manifest:abc")
    assert catalog.stored_selection() is None and not catalog.has_listings()
    catalog.save_selection(chosen)
    catalog.replace_children(ROOT_INODE, _kids("C"))
    catalog.close()

    catalog = Catalog(path, "server|manifest:abc")
    assert catalog.stored_selection() == chosen and catalog.has_listings()
    catalog.save_selection(None)  # the whole archive again: nothing to keep
    assert catalog.stored_selection() is None
    catalog.save_selection(chosen)
    catalog.close()

    catalog = Catalog(path, "server|manifest:other")  # another source forgets it
    assert catalog.stored_selection() is None and not catalog.has_listings()
    catalog.close()


def test_studies_and_series_are_found_by_uid_and_instances_not(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", "src")
    cat.replace_children(ROOT_INODE, _kids("A"))
    (a,) = cat.children(ROOT_INODE)
    cat.replace_children(a.ino, [NewChild("p", Kind.PATIENT, "p", "A")])
    (p,) = cat.children(a.ino)
    cat.replace_children(p.ino, [NewChild("1.2", Kind.STUDY, "1.2", "A")])
    (study,) = cat.children(p.ino)
    cat.replace_children(study.ino, [NewChild("1.2.3", Kind.SERIES, "1.2.3", "A", "1.2.3")])
    (series,) = cat.children(study.ino)
    cat.replace_children(series.ino, [NewChild("1.2.3.4.dcm", Kind.INSTANCE, "1.2.3.4", "A",
                                               "1.2.3")])
    assert [cat.find_uid(uid).ino for uid in ("1.2", "1.2.3")] == [study.ino, series.ino]
    assert cat.find_uid("1.2.3.4") is None and cat.find_uid("9.9") is None
    cat.close()
    reopened = Catalog(tmp_path / "c.sqlite", "src")  # the index is made for old catalogs too
    assert reopened.db.execute("SELECT count(*) FROM sqlite_master WHERE name='nodes_uid'"
                               ).fetchone()[0] == 1
    assert reopened.find_uid("1.2.3").ino == series.ino
