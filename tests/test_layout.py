import datetime as dt

import pytest

from tciafs import layout, manifest

pytestmark = pytest.mark.unit


def test_descriptive_names_match_the_retriever_examples() -> None:
    # Real directory names from NBIA Data Retriever downloads.
    assert layout.study_name("1.2.30178", dt.date(2000, 1, 1), None, None) == \
        "01-01-2000-NA-NA-30178"
    assert layout.series_name("1.2.3.03192", 3000566.0, None) == "3000566.000000-NA-03192"
    assert layout.study_name("1.2.92442", dt.date(1998, 12, 1), None,
                             "PETCT HEAD & NECK CA") == "12-01-1998-NA-PETCT HEAD  NECK CA-92442"
    assert layout.series_name("1.2.25068", 2.0, "CT Atten Cor Head IN") == \
        "2.000000-CT Atten Cor Head IN-25068"
    assert layout.study_name("1.2.96508", dt.date(2006, 9, 20), "1", None) == \
        "09-20-2006-1-NA-96508"
    assert layout.series_name("1.2.00046", 1001.0, None) == "1001.000000-NA-00046"


def test_descriptions_are_cleaned_and_cut() -> None:
    name = layout.series_name("9.87654", 1.0, "a/b: " + "x" * 80)
    assert name.startswith("1.000000-a-b ") and name.endswith("-87654")
    assert len(name.split("-", 1)[1].rsplit("-", 1)[0]) <= 53
    assert layout.series_name("1.11111", 4.0, "-") == "4.000000-11111"  # only a dash: left out


def test_clashing_suffixes_widen_until_unique() -> None:
    uids = ["1.2.3.100012345", "1.2.3.200012345"]
    got = layout.disambiguate(uids, lambda u, n: layout.series_name(u, 1.0, "CT", n))
    assert got == ["1.000000-CT-23100012345", "1.000000-CT-23200012345"]
    alone = layout.disambiguate(uids[:1], lambda u, n: layout.series_name(u, 1.0, "CT", n))
    assert alone == ["1.000000-CT-12345"]  # no clash, no widening


def test_manifest_parsing_follows_the_retriever() -> None:
    text = """downloadServerUrl=https://example.invalid/nbia-download/servlet/DownloadServlet
includeAnnotation=true
noOfrRetry=4
databasketId=manifest-1598890146597.tcia
manifestVersion=3.0
ListOfSeriesToDownload=
1.2.246.352.71.2.494841863751.4253616.20190218155318
# a comment
 1.3.6.1.4.1.9590.100.1.2.170217758912108379426621313680109428629\r

1.2.246.352.71.2.494841863751.4253616.20190218155318
"""
    assert manifest.parse(text) == ["1.2.246.352.71.2.494841863751.4253616.20190218155318",
                                    "1.3.6.1.4.1.9590.100.1.2.170217758912108379426621313680109428629"]
    assert manifest.parse("1.2.3\n4.5.6\n") == ["1.2.3", "4.5.6"]
