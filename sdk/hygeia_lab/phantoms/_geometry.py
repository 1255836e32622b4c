"""Drawing primitives of the phantoms, in millimetres: anti-aliased steps and lines, smooth random
fields, point splats and branching trees (vessels, bronchi).

A private module of :mod:`hygeia_lab.phantoms`: the anatomy and the findings are built from these.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from hygeia.vocab import CHEST_FOV_MM

FOV_MM = CHEST_FOV_MM
"""Field of view (mm) of every phantom, whatever its size in pixels (:data:`hygeia.vocab.CHEST_FOV_MM`)."""


def _ramp(sd: np.ndarray | float, soft: float) -> Any:
    """Anti-aliased step: 0 outside (sd < 0), 1 inside, linear over ``soft`` mm."""
    return np.clip(0.5 + np.asarray(sd) / soft, 0.0, 1.0)


def _line(d: np.ndarray, half_w: float, px: float) -> np.ndarray:
    """A line of width ``2*half_w`` mm at distance ``d``, keeping its integral when sub-pixel."""
    hb = max(half_w, px)
    return np.clip(1.0 - np.abs(d) / hb, 0.0, None) * (half_w / hb)


def _smooth_field(rng: np.random.Generator, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth random field on an ``n x n`` lattice over normalised coords ``u, v`` in [0, 1]."""
    lat = rng.standard_normal((n, n))
    coords = np.stack([np.clip(v, 0, 1) * (n - 1), np.clip(u, 0, 1) * (n - 1)])
    return ndimage.map_coordinates(lat, coords, order=3, mode="nearest")


def _splat(points: np.ndarray, weights: np.ndarray, size: int, px: float, sigma_mm: float) -> np.ndarray:
    """Deposit weighted points (mm) on the pixel grid (bilinear), then blur: anti-aliased lines."""
    out = np.zeros((size, size), np.float64)
    if len(points):
        c = (points[:, 0] + FOV_MM / 2) / px - 0.5
        r = (points[:, 1] + FOV_MM / 2) / px - 0.5
        c0, r0 = np.floor(c).astype(int), np.floor(r).astype(int)
        fc, fr = c - c0, r - r0
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            np.add.at(out, (rr[ok], cc[ok]), (weights * w)[ok])
    s = max(sigma_mm / px, 0.5)
    return ndimage.gaussian_filter(out, s, mode="constant", truncate=3.0)


def _tree(rng: np.random.Generator, root: np.ndarray, angles: np.ndarray, length: float, width: float,
          depth: int, spread: float = 0.45, step: float = 1.8) -> tuple[np.ndarray, np.ndarray]:
    """A branching tree (vessels, bronchi) as sample points (mm) and their widths (mm)."""
    starts = np.repeat(root[None], len(angles), 0).astype(float)
    ang = angles.astype(float)
    L = np.full(len(angles), length)
    w = np.full(len(angles), width)
    pts, wid = [], []
    for _ in range(depth):
        ang = ang + rng.normal(0, 0.12, len(ang))
        L = L * rng.uniform(0.75, 1.25, len(L))
        ends = starts + np.stack([np.cos(ang), np.sin(ang)], 1) * L[:, None]
        k = max(2, int(np.ceil(L.max() / step)))
        t = (np.arange(k) / k)[None, :, None]
        pts.append((starts[:, None, :] + t * (ends - starts)[:, None, :]).reshape(-1, 2))
        # the sample spacing differs per branch: fold it into the width so density is kept
        wid.append(np.repeat(w * np.sqrt(L / (k * step)), k))
        # two children per branch
        sp = rng.uniform(0.6, 1.0, len(ang)) * spread
        starts = np.repeat(ends, 2, 0)
        ang = np.stack([ang - sp, ang + sp * rng.uniform(0.6, 1.2, len(ang))], 1).ravel()
        L = np.repeat(L * 0.72, 2)
        w = np.repeat(w * 0.68, 2)
    return np.concatenate(pts), np.concatenate(wid)


def _to_image_frame(points: np.ndarray, ct: float, st: float) -> np.ndarray:
    """Rotate points (mm, patient frame) into the image frame: the grid is tilted, a splat is not."""
    x = ct * points[:, 0] - st * points[:, 1]
    y = st * points[:, 0] + ct * points[:, 1]
    return np.stack([x, y], 1)
