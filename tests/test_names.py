import pytest

from tciafs import names

pytestmark = pytest.mark.unit

AWKWARD = ["LUNG-001", "LUNG 002", "LUNG/003", ".hidden-004", "Pétra-005", ".", "..",
           "a%b", "", "tab\there", "nul\x00byte", "100%", "%2F", "/", "ü/..", " lead space"]


@pytest.mark.parametrize("ident", AWKWARD)
def test_round_trip(ident: str) -> None:
    name = names.encode(ident)
    assert names.decode(name) == ident
    assert "/" not in name and "\x00" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert names.is_canonical(name)


def test_distinct_identifiers_get_distinct_names() -> None:
    encoded = [names.encode(i) for i in AWKWARD]
    assert len(set(encoded)) == len(AWKWARD)


def test_plain_names_are_untouched() -> None:
    assert names.encode("Demo-Lung CT_2024") == "Demo-Lung CT_2024"
    assert names.encode("1.3.6.1.4.1.9328.50.1.2") == "1.3.6.1.4.1.9328.50.1.2"


def test_long_names_fit_name_max_and_stay_unique() -> None:
    a, b = "x" * 1000, "x" * 999 + "y"
    ea, eb = names.encode(a), names.encode(b)
    assert len(ea.encode()) <= names.NAME_MAX and len(eb.encode()) <= names.NAME_MAX
    assert ea != eb
    assert names.decode(ea) is None
    long_escapes = "/" * 300
    assert len(names.encode(long_escapes).encode()) <= names.NAME_MAX


def test_non_canonical_spellings_are_rejected() -> None:
    assert not names.is_canonical("LUNG%2f003")  # lowercase hex is not what we write
    assert not names.is_canonical("a%41")  # 'A' never needs escaping


@pytest.mark.parametrize("junk", [".Trash-1000", ".Trash", ".DS_Store", "desktop.ini",
                                  "autorun.inf", ".git", ".hidden", "._foo"])
def test_junk_names(junk: str) -> None:
    assert names.is_junk(junk)


def test_real_names_are_not_junk() -> None:
    assert not any(names.is_junk(names.encode(i)) for i in AWKWARD)


def test_a_suffix_stays_within_name_max() -> None:
    name = names.encode("1." * 500, ".dcm")
    assert name.endswith(".dcm") and len(name.encode()) <= names.NAME_MAX
    assert names.encode("1.2.3", ".dcm") == "1.2.3.dcm"
