"""The benchmark's chart, drawn with matplotlib (the `bench` extra).

One horizontal bar per figure: its value divided by its baseline, green where the figure's
target holds, red where it misses. A black tick on each row marks that figure's target,
restated as a ratio (Target.ratio_limit), and a pale band the side of it where it misses.
Figure names sit on the y axis and the numbers in a column right of the plot, so no label
can run over a bar or a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as Drawing
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .report import Figure

COLOURS = {"holds": "#2da44e", "misses": "#cf222e", "error": "#8c959f"}
TARGET_COLOUR = "#1f2328"
DOT_BELOW = 0.02  # bars shorter than this fraction of the axis also get a dot
EDGE_ROOM = 1.08  # the axis runs this far past the largest target or bar
CUT_AT = 2.0  # bars longer than this many times the largest target are cut at the edge
ROW_INCHES = 0.42
TOP_INCHES, BOTTOM_INCHES, WIDTH_INCHES = 0.9, 1.15, 11.0
GREY = "#57606a"
MISS_BAND = "#fbe4e6"
FOOTNOTE = ("Bar: the figure's value divided by its baseline, both measured in this run. "
            "Tick: the figure's target as a ratio to that baseline. Shaded: where the "
            "target misses.\nDotted: ratio 1, the baseline itself. A bar cut at the right "
            "edge is marked », its ratio is in the column.")


@dataclass(frozen=True)
class Row:
    """What the chart shows of one figure."""

    key: str
    ratio: float | None  # None: not measured
    target: float | None  # None: the target cannot be put as a ratio
    op: str
    verdict: str  # a key of COLOURS
    target_text: str
    error: str | None  # set exactly when ratio is None

    @classmethod
    def of(cls, fig: Figure) -> Row:
        verdict = "holds" if fig.holds else ("misses" if fig.measured else "error")
        ratio, error = (fig.ratio, None) if fig.measured else (None, fig.error or "not measured")
        return cls(fig.key, ratio, fig.target.ratio_limit(fig.baseline), fig.target.op,
                   verdict, fig.target.text(), error)

    def column(self, width: int) -> str:
        ratio = "-" if self.ratio is None else f"{self.ratio:.3g}"
        return f"{ratio:>6}  {self.target_text:<{width}}"


def write_chart(folder: Path, figures: list[Figure], title: str, subtitle: str) -> list[Path]:
    """Write chart.png and chart.svg into `folder`; returns their paths."""
    canvas = draw([Row.of(f) for f in figures], title, subtitle)
    paths = [folder / "chart.png", folder / "chart.svg"]
    for path in paths:
        canvas.savefig(path, dpi=110, bbox_inches="tight")
    return paths


def draw(rows: list[Row], title: str, subtitle: str) -> Drawing:
    height = TOP_INCHES + ROW_INCHES * len(rows) + BOTTOM_INCHES
    canvas = Drawing(figsize=(WIDTH_INCHES, height))
    FigureCanvasAgg(canvas)  # Agg draws without a display, on servers and in CI
    canvas.subplots_adjust(left=0.22, right=0.6, top=1 - TOP_INCHES / height,
                           bottom=BOTTOM_INCHES / height)
    ax = canvas.add_subplot()
    edge = _edge(rows)
    width = max(len(r.target_text) for r in rows)  # of the target column, in characters
    for y, row in enumerate(rows):
        _bar(ax, y, row, edge)
        _target(ax, y, row, edge)
        _column(ax, y, row.column(width), row.verdict, COLOURS[row.verdict])
    _column(ax, -0.75, f"{'ratio':>6}  {'target':<{width}}", "verdict", GREY, header=True)
    _axes(ax, rows, edge)
    _margins(canvas, height, title, subtitle)
    return canvas


def _margins(canvas: Drawing, height: float, title: str, subtitle: str) -> None:
    inches = canvas.dpi_scale_trans  # placed in inches: the margins do not grow with rows
    canvas.text(0.15, height - 0.1, title, transform=inches, va="top", fontsize=12,
                fontweight="bold")
    canvas.text(0.15, height - 0.35, subtitle, transform=inches, va="top", fontsize=9,
                color=GREY)
    handles = [Patch(color=c, label=v) for v, c in COLOURS.items()] + [
        Line2D([], [], color=TARGET_COLOUR, lw=2.5, label="target"),
        Patch(color=MISS_BAND, label="where the target misses")]
    canvas.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.1, 0.62),
                  bbox_transform=inches, ncols=len(handles), frameon=False, fontsize=9)
    canvas.text(0.15, 0.3, FOOTNOTE, transform=inches, va="top", fontsize=8, color=GREY)


def _edge(rows: list[Row]) -> float:
    targets = [r.target for r in rows if r.target is not None] or [1.0]
    ratios = [r.ratio for r in rows if r.ratio is not None and math.isfinite(r.ratio)]
    longest = min(max(ratios, default=0.0), CUT_AT * max(targets))
    return EDGE_ROOM * max(*targets, longest, 1.0)


def _bar(ax: Axes, y: int, row: Row, edge: float) -> None:
    if row.ratio is None:
        ax.text(0.01 * edge, y, _shorten(row.error or "", 70), va="center",
                fontsize=8, color=COLOURS["error"], style="italic")
        return
    length = min(row.ratio, edge)
    ax.barh(y, length, height=0.6, color=COLOURS[row.verdict], zorder=2)
    if length < DOT_BELOW * edge:  # too short to see: a dot shows where it ends, and its colour
        ax.plot(length, y, "o", color=COLOURS[row.verdict], markersize=8, zorder=5,
                clip_on=False)
    if row.ratio > edge:
        ax.text(edge, y, "» ", ha="right", va="center", color="white", fontsize=12,
                fontweight="bold", zorder=3)


def _target(ax: Axes, y: int, row: Row, edge: float) -> None:
    if row.target is None or row.ratio is None:  # an unmeasured row holds its error text
        return
    # A pale band over the side of the tick where the target misses: the bar must stay
    # out of it (">=" misses left of the tick, "<=" right of it, "==" on both sides).
    misses = {"<=": [(row.target, edge)], ">=": [(0.0, row.target)],
              "==": [(0.0, row.target), (row.target, edge)]}[row.op]
    for start, end in misses:
        ax.barh(y, end - start, left=start, height=0.84, color=MISS_BAND, zorder=1)
    ax.plot([row.target, row.target], [y - 0.42, y + 0.42], color=TARGET_COLOUR, lw=2.5,
            solid_capstyle="butt", zorder=4)


def _column(ax: Axes, y: float, text: str, verdict: str, verdict_colour: str,
            header: bool = False) -> None:
    """One line of the table right of the plot: monospace, so its columns line up."""
    at = ax.get_yaxis_transform()  # x in axes fractions, y in rows
    numbers = ax.text(1.02, y, text, transform=at, va="center", family="monospace",
                      fontsize=9, color=GREY if header else TARGET_COLOUR)
    ax.annotate(verdict, xy=(1, 0.5), xycoords=numbers, xytext=(8, 0),
                textcoords="offset points", va="center", fontsize=9, color=verdict_colour,
                fontweight="normal" if header else "bold")


def _axes(ax: Axes, rows: list[Row], edge: float) -> None:
    ax.set_xlim(0, edge)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first figure on top
    ax.set_yticks(range(len(rows)), [r.key for r in rows], fontsize=9)
    ax.set_xlabel("value / baseline", fontsize=9)
    ax.axvline(1.0, color="#8c959f", lw=0.8, ls=":", zorder=1)  # the baseline itself
    ax.grid(axis="x", color="#eaeef2", zorder=0)
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", length=0, pad=8)  # room for a dot at ratio 0
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _shorten(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"
