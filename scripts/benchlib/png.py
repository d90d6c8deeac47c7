"""A bar chart as a PNG, written with zlib and struct only (matplotlib is not a dependency).

One row per figure: its key and target, and a bar whose length is the figure's distance
to its target (1.0 = exactly on target, shorter is better), green when it holds and red
when it does not. A vertical line marks the target. Text uses a built-in 5x7 font.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .report import Figure

# 5x7 glyphs: seven rows of five bits, most significant bit on the left.
_FONT_ROWS = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E",
    "9": "0E11110F01020C", "A": "0E1111111F1111", "B": "1E11111E11111E",
    "C": "0E11101010110E", "D": "1C12111111121C", "E": "1F10101E10101F",
    "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111",
    "O": "0E11111111110E", "P": "1E11111E101010", "Q": "0E11111115120D",
    "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A",
    "X": "11110A040A1111", "Y": "1111110A040404", "Z": "1F01020408101F",
    " ": "00000000000000", ".": "00000000000C0C", ",": "000000000C0408",
    ":": "000C0C000C0C00", ";": "000C0C000C0408", "<": "02040810080402", ">": "08040201020408",
    "=": "00001F001F0000", "%": "18190204081303", "-": "0000001F000000",
    "_": "0000000000001F", "(": "02040808080402", ")": "08040202020408",
    "/": "00010204081000", "+": "0004041F040400", "?": "0E110102040004",
    "!": "04040404000004",
}
FONT = {ch: bytes.fromhex(rows) for ch, rows in _FONT_ROWS.items()}

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
GREY: Color = (170, 170, 170)
GREEN: Color = (46, 160, 67)
RED: Color = (207, 34, 46)
BLUE: Color = (9, 105, 218)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            start = (yy * self.width + x0) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw `text` (upper-cased) with its top-left at (x, y); returns the end x."""
        for ch in text.upper():
            glyph = FONT.get(ch, FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (0x10 >> col):
                        self.rect(x + col * scale, y + row * scale, scale, scale, color)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride])
                       for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


SCALE_MAX = 2.5  # bars are cut at 2.5 times the target
LEFT, BAR_X, BAR_W, ROW_H, TOP = 16, 16, 760, 54, 64


def chart(figures: list[Figure], title: str) -> bytes:
    canvas = Canvas(BAR_X + BAR_W + 170, TOP + ROW_H * len(figures) + 40)
    canvas.text(LEFT, 14, title, BLACK, 2)
    canvas.text(LEFT, 38, "bar = distance to target (line = target; shorter is better)", GREY, 1)
    target_x = BAR_X + int(BAR_W / SCALE_MAX)
    for i, fig in enumerate(figures):
        canvas.rect(target_x, TOP + i * ROW_H + 12, 2, 26, BLUE)  # under the bar and text
        _row(canvas, fig, TOP + i * ROW_H)
    canvas.text(target_x - 18, TOP + ROW_H * len(figures) + 4, "target", BLUE, 1)
    return canvas.png()


def _row(canvas: Canvas, fig: Figure, y: int) -> None:
    verdict = "holds" if fig.holds else ("error" if fig.error else "misses")
    ratio = "-" if fig.ratio is None else f"{fig.ratio:.3g}"
    canvas.text(LEFT, y, f"{fig.key}  ratio {ratio}  {fig.target.text()}  {verdict}", BLACK, 1)
    score = fig.score()
    if score is None:
        canvas.rect(BAR_X, y + 14, BAR_W, 22, (235, 235, 235))
        canvas.text(BAR_X + 6, y + 18, (fig.error or "not measured")[:120], GREY, 1)
        return
    length = max(2, int(BAR_W * min(score, SCALE_MAX) / SCALE_MAX))
    canvas.rect(BAR_X, y + 14, length, 22, GREEN if fig.holds else RED)
    label = f"{score:.2f}x target" if score < 1e6 else "inf"
    canvas.text(BAR_X + length + 6, y + 18, label, BLACK, 2 if score <= SCALE_MAX else 1)


def write_chart(path: Path, figures: list[Figure], title: str) -> None:
    path.write_bytes(chart(figures, title))
