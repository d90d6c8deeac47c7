"""The phantoms a series' pixels are drawn from: CT chest, MR head, PET chest.

Coordinates are in mm (patient space), so a 64x64 scale image and a 512x512 demo image
show the same anatomy. Each plane is drawn from its own seeded generator: pure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

NODULE_XY = (-80.0, -10.0)  # mm, in the right lung; the RTSTRUCT outlines it
NODULE_RADIUS = 10.0


@dataclass(frozen=True)
class Grid:
    x: np.ndarray  # mm, per column (1 x cols)
    y: np.ndarray  # mm, per row (rows x 1)
    r2: np.ndarray  # squared distance from the centre (rows x cols)


@functools.lru_cache(maxsize=16)
def grid(rows: int, cols: int, spacing: float) -> Grid:
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing)[None, :]
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing)[:, None]
    return Grid(x, y, x * x + y * y)


def _ellipse(g: Grid, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((g.x - cx) / a) ** 2 + ((g.y - cy) / b) ** 2 <= 1.0


def _taper(z_rel: float, half_length: float) -> float:
    """Organ cross-section scale: full at the centre, shrinking towards the ends."""
    return float(np.sqrt(max(0.15, 1.0 - (z_rel / half_length) ** 2)))


# Noise levels chosen so that zlib level 6 compresses a 512x512 slice about 2.4x,
# as real CT does (measured in the tests).
_CT_NOISE_HU = 10.0
_CT_NOISE_AIR_HU = 14.0
_CT_FOV_RADIUS_MM = 180.0


def ct_plane(g: Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    hu = np.full(g.r2.shape, -1000.0, dtype=np.float32)
    hu[_ellipse(g, 0, 10, 155, 105)] = 40.0  # body
    hu[_ellipse(g, 0, 10, 143, 94)] = -90.0  # subcutaneous fat
    hu[_ellipse(g, 0, 10, 133, 85)] = 35.0  # muscle and mediastinum
    lung = _taper(z_rel, 160.0)
    hu[_ellipse(g, -60, 0, 48 * lung, 66 * lung)] = -850.0
    hu[_ellipse(g, 60, 0, 48 * lung, 66 * lung)] = -850.0
    hu[_ellipse(g, 0, 68, 15, 15)] = 700.0  # vertebra
    hu[_ellipse(g, 12, -30, 24, 20)] = 45.0  # heart
    if abs(z_rel) < NODULE_RADIUS:
        r = np.sqrt(NODULE_RADIUS**2 - z_rel**2)
        hu[_ellipse(g, *NODULE_XY, r, r)] = 30.0
    sigma = np.where(hu < -500, _CT_NOISE_AIR_HU, _CT_NOISE_HU).astype(np.float32)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * sigma
    stored = np.rint(hu + 1024.0)
    stored[g.r2 > _CT_FOV_RADIUS_MM**2] = -2000.0  # outside the reconstruction circle
    return stored.astype("<i2")


def mr_plane(g: Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    head = _taper(z_rel, 110.0)
    signal = np.zeros(g.r2.shape, dtype=np.float32)
    signal[_ellipse(g, 0, 0, 80 * head, 100 * head)] = 900.0  # scalp and skull marrow
    signal[_ellipse(g, 0, 0, 72 * head, 92 * head)] = 120.0  # skull
    signal[_ellipse(g, 0, 0, 68 * head, 88 * head)] = 600.0  # grey matter
    signal[_ellipse(g, 0, 0, 50 * head, 68 * head)] = 750.0  # white matter
    signal[_ellipse(g, -10, -5, 6 * head, 20 * head)] = 200.0  # ventricles
    signal[_ellipse(g, 10, -5, 6 * head, 20 * head)] = 200.0
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * 18.0
    magnitude = np.hypot(signal + noise[0], noise[1])  # Rician, like a magnitude image
    return np.clip(np.rint(magnitude), 0, 4095).astype("<u2")


def pt_plane(g: Grid, z_rel: float, rng: np.random.Generator) -> np.ndarray:
    counts = np.zeros(g.r2.shape, dtype=np.float32)
    counts[_ellipse(g, 0, 10, 155, 105)] = 300.0
    counts[_ellipse(g, 12, -30, 24, 20)] = 1500.0  # myocardium takes up FDG
    if abs(z_rel) < 20:
        counts[_ellipse(g, *NODULE_XY, 12, 12)] = 4000.0
    counts += rng.standard_normal(counts.shape, dtype=np.float32) * np.sqrt(counts + 25.0) * 3
    return np.clip(np.rint(counts), 0, 65535).astype("<u2")
