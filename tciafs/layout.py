"""Directory names for studies and series, in the two layouts.

`uid` (the default) names a study by its StudyInstanceUID and a series by its
SeriesInstanceUID. `descriptive` reproduces the NBIA Data Retriever's names, so that
scripts written against its downloads run unchanged:

    <StudyDate MM-DD-YYYY>-<StudyID>-<StudyDescription>-<last 5 digits of the UID>
    <SeriesNumber, six decimals>-<SeriesDescription>-<last 5 digits of the UID>

Descriptions lose every character outside [A-Za-z0-9 .-] (as the service strips
them; '/' becomes '-' first) and are cut to 53 characters. A missing value is written
NA; a value that is empty (or only '-') after cleaning is left out with its dash. When
two siblings end up with the same name, more digits of their UIDs are used.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from tciafs import names

LAYOUTS = ("uid", "descriptive")
_NOT_KEPT = re.compile(r"[^A-Za-z0-9 .\-]")

T = TypeVar("T")


def _description(text: str | None) -> str | None:
    if text is None:
        return "NA"
    cleaned = _NOT_KEPT.sub("", text.replace("/", "-"))[:53]
    return None if cleaned in ("", "-") else cleaned


def _date(value: dt.date | str | None) -> str:
    if value is None:
        return "NA"
    day = dt.date.fromisoformat(value) if isinstance(value, str) else value
    return day.strftime("%m-%d-%Y")


def _digits(uid: str, n: int) -> str:
    return uid.replace(".", "")[-n:]


def study_name(uid: str, date: dt.date | str | None, study_id: str | None,
               description: str | None, digits: int = 5) -> str:
    parts = [_date(date), study_id or "NA", _description(description), _digits(uid, digits)]
    return names.encode("-".join(p for p in parts if p))


def series_name(uid: str, number: float | None, description: str | None,
                digits: int = 5) -> str:
    shown = "NA" if number is None else f"{number:.6f}"
    parts = [shown, _description(description), _digits(uid, digits)]
    return names.encode("-".join(p for p in parts if p))


def disambiguate(items: Sequence[T], name_of: Callable[[T, int], str]) -> list[str]:
    """Names for `items`, widening the UID suffix of clashing ones until all differ."""
    digits = [5] * len(items)
    while True:
        chosen = [name_of(item, d) for item, d in zip(items, digits, strict=True)]
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(chosen):
            seen.setdefault(name, []).append(i)
        clashes = [i for group in seen.values() if len(group) > 1 for i in group]
        if not clashes or all(digits[i] >= 64 for i in clashes):
            return chosen
        for i in clashes:
            digits[i] += 3
