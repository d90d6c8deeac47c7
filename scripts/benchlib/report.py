"""Figures, their targets, the printed table and the JSON document."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Target:
    """`of` (ratio, value or value - baseline) compared with `limit` by `op`."""

    op: str
    limit: float
    of: str = "ratio"
    unit: str = ""

    def text(self) -> str:
        subject = "value - baseline" if self.of == "difference" else self.of
        unit = f" {self.unit}" if self.unit else ""
        return f"{subject} {self.op} {self.limit:g}{unit}"

    def subject(self, value: float, baseline: float, ratio: float) -> float:
        return {"ratio": ratio, "value": value, "difference": value - baseline}[self.of]

    def holds(self, value: float, baseline: float, ratio: float) -> bool:
        return _OPS[self.op](self.subject(value, baseline, ratio), self.limit)

    def ratio_limit(self, baseline: float | None) -> float | None:
        """The limit restated as a ratio to `baseline`, so that one axis holds every figure.

        value <= L is ratio <= L / baseline, and value - baseline <= L is
        ratio <= 1 + L / baseline; neither can be restated without a positive baseline.
        """
        if self.of == "ratio":
            return self.limit
        if baseline is None or baseline <= 0:
            return None
        return self.limit / baseline + (1.0 if self.of == "difference" else 0.0)


@dataclass
class Figure:
    key: str  # the JSON name, e.g. "1_cold_series_copy"
    title: str
    unit: str  # of value and baseline
    target: Target
    value: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def measured(self) -> bool:
        return self.error is None and self.value is not None and self.baseline is not None

    def set(self, value: float, baseline: float, ratio: float | None = None) -> None:
        self.value, self.baseline = value, baseline
        self.ratio = ratio if ratio is not None else (value / baseline if baseline else math.inf)

    @property
    def holds(self) -> bool:
        if not self.measured:
            return False
        assert self.value is not None and self.baseline is not None and self.ratio is not None
        return self.target.holds(self.value, self.baseline, self.ratio)

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "value": _finite(self.value), "baseline": _finite(self.baseline),
            "ratio": _finite(self.ratio), "target": self.target.text(), "holds": self.holds,
            "title": self.title, "unit": self.unit, "note": self.note,
            "samples": self.samples, "details": self.details}
        if self.error:
            doc["error"] = self.error
        return doc


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)


def figures_json(figures: list[Figure]) -> dict[str, Any]:
    return {f.key: f.as_json() for f in figures}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _num(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if abs(x) >= 100 or x == 0:
        text = f"{x:.0f}"
    elif abs(x) >= 1:
        text = f"{x:.2f}"
    else:
        text = f"{x:.3f}"
    return f"{text} {unit}".strip()


def table(figures: list[Figure]) -> str:
    header = ("figure", "value", "baseline", "ratio", "target", "holds")
    rows = [header] + [
        (f"{f.key}", _num(f.value, f.unit), _num(f.baseline, f.unit), _num(f.ratio),
         f.target.text(), "yes" if f.holds else ("ERROR" if f.error else "NO"))
        for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.key}: {f.title}. {f.error or f.note}".rstrip() for f in figures]
    return "\n".join(lines + ["", *notes])
