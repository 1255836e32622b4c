"""The findings of a phantom, one function each, drawn over the normal anatomy.

Each finding function reads the patient, the grid and the normal layers from a :class:`_Scene`,
draws its random numbers from the findings stream (``scene.rng``) and changes the scene: density
added (``extra``), lung air and vessels removed (``air_keep``, ``vessel_keep``), its mask, a score
map (where to put a one-pixel mask if the finding covers no pixel centre) and its measurements in
``meta``. They run in the order of :data:`_DRAW_ORDER`, which fixes the order of the random draws.
:func:`_draw_mimics` then draws look-alikes of absent findings (``mimics > 0`` only).

A private module of :mod:`hygeia_lab.phantoms`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._geometry import _line, _ramp, _smooth_field, _splat, _to_image_frame, _tree
from .anatomy import _Anatomy, _Grid, _Layers


@dataclass
class _Scene:
    """One phantom while its findings are drawn."""

    a: _Anatomy
    g: _Grid
    L: _Layers
    rng: np.random.Generator  # the findings stream
    cm: float  # finding contrast multiplier (from the difficulty)
    ctr_drawn: float  # cardiothoracic ratio of the drawn heart
    meta: dict[str, Any]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    ptx: np.ndarray | None = None  # the pleural space of a pneumothorax
    subtle: float = 0.0  # difficulty above 1: smaller effusions and pneumothoraces (0 at the default)
    look_alike: bool = False  # drawing a look-alike of an absent finding (smaller: see _draw_mimics)

    def __post_init__(self) -> None:
        self.extra = np.zeros_like(self.L.D)  # added density (soft tissue replacing air)
        self.air_keep = np.ones_like(self.L.D)  # multiplier on lung air
        self.vessel_keep = np.ones_like(self.L.D)


def _pick_point(s: _Scene, min_sd: float, tries: int = 200, side: int | None = None) -> tuple[float, float, int]:
    """A point (mm) and its side, at least ``min_sd`` inside a lung and clear of the heart."""
    a, r = s.a, s.rng
    for _ in range(tries):
        sg = side if side is not None else int(r.choice([-1, 1]))
        x = a.xc + sg * r.uniform(0.1, 1.0) * a.W
        y = r.uniform(a.y_apex, a.dome_top(sg) + a.dome_h)
        xa, ya = np.array([x]), np.array([y])
        if a.lung_sd(xa, ya, sg)[0] > min_sd and a.heart_sd(xa, ya, s.ctr_drawn)[1][0] < -min_sd * 0.5:
            return x, y, sg
    return a.xc + sg * 0.5 * a.W, a.y_apex + 0.45 * (a.y_dome - a.y_apex), sg


def _effusion(s: _Scene) -> None:
    """Fluid in the costophrenic recess rising laterally (meniscus); right, left or both."""
    a, r, X, Y, px = s.a, s.rng, s.g.X, s.g.Y, s.g.px
    u = r.random()
    sides = [-1] if u < 0.4 else [1] if u < 0.75 else [-1, 1]
    vol = float(r.uniform(0, 1) ** 1.8) * (0.5 if s.look_alike else 1.0)  # thickening: a blunted angle
    emask = np.zeros(X.shape, bool)
    for sg in sides:
        sd = s.L.sd[0 if sg < 0 else 1]
        v = vol * (r.uniform(0.5, 1.0) if len(sides) > 1 else 1.0)
        y_cp = a.dome_top(sg) + a.dome_h  # costophrenic angle level
        h = (14 + 120 * v) / (1.0 + s.subtle)
        lam = 18 + 25 * v
        dl = a.d_lat(X, Y, sg)
        y_surf = y_cp - 0.55 * h + 12 - (0.45 * h) * np.exp(-np.clip(dl, 0, None) / lam)
        fluid = np.clip((Y - y_surf) / (10 + 18 * v), 0, 1) * _ramp(sd + 6, max(2, px))
        fluid *= 0.55 + 0.45 * min(1.0, s.cm)
        s.air_keep *= 1 - 0.97 * fluid
        s.vessel_keep *= 1 - fluid
        s.extra += 0.06 * fluid * _ramp(a.dome(X, sg) - Y + 8, 6.0)  # silhouette the dome
        emask |= (fluid > 0.25) & (sd > -4)
    s.masks["effusion"] = emask
    s.scores["effusion"] = 1 - s.air_keep
    s.meta["effusion_volume"] = round(vol, 3)
    s.meta["effusion_sides"] = ["right" if sg < 0 else "left" for sg in sides]


def _air_bronchograms(s: _Scene, cx: float, cy: float, sg: int, R: float) -> np.ndarray:
    """Bronchi pointing away from the hilum through a consolidation, as a density map."""
    hx, hy = s.a.hilum[(sg + 1) // 2]
    ang = np.arctan2(cy - hy, cx - hx)
    start = np.array([cx, cy]) - 0.6 * R * np.array([np.cos(ang), np.sin(ang)])
    bp, bwid = _tree(s.rng, start, np.array([ang, ang + 0.4]), 0.45 * R, 3.0, 3, spread=0.35)
    g = s.g
    return _splat(_to_image_frame(bp, g.ct, g.st), bwid ** 2 * 2.0 / g.px, g.size, g.px, 0.7)


def _consolidation(s: _Scene) -> None:
    """Patchy union of blobs modulated by noise, sometimes fissure-bounded, sometimes with air
    bronchograms; it removes the vessels it covers (silhouette)."""
    a, r, X, Y, px = s.a, s.rng, s.g.X, s.g.Y, s.g.px
    cx, cy, sg = _pick_point(s, 15.0)
    R = float(r.uniform(12, 58) * a.s) * (0.8 if s.look_alike else 1.0)  # atelectasis: smaller
    nb = int(r.integers(4, 10))
    fieldc = np.zeros_like(s.L.D)
    for _ in range(nb):
        bx, by = cx + r.normal(0, R * 0.5), cy + r.normal(0, R * 0.5)
        br = R * r.uniform(0.3, 0.7)
        fieldc += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * br ** 2))
    fieldc = fieldc * (0.75 + 0.5 * _smooth_field(r, 14, s.g.U, s.g.V))
    dens = float(r.uniform(0.2, 0.75)) * min(1.2, 0.35 + 0.65 * s.cm)
    op = np.clip((fieldc - 0.45) / 0.5, 0, 1) * dens
    if r.random() < 0.35:  # fissure-bounded: a sharp straight edge
        th = r.uniform(0, np.pi)
        nx, ny = np.cos(th), np.sin(th)
        op = op * _ramp((X - cx) * nx + (Y - cy) * ny + R * 0.3, max(1.0, px))
    op = op * _ramp(s.L.sd[0 if sg < 0 else 1], max(2.0, px))
    if dens > 0.5 and r.random() < 0.5:
        op = op * (1 - np.clip(_air_bronchograms(s, cx, cy, sg, R) * 0.12, 0, 0.6))
        s.meta["air_bronchograms"] = True
    s.air_keep *= 1 - op
    s.vessel_keep *= 1 - np.clip(op * 1.3, 0, 1)
    s.masks["consolidation"] = op > 0.12 * dens
    s.scores["consolidation"] = op
    s.meta["consolidation_radius_mm"] = round(R, 1)


def _pneumothorax(s: _Scene) -> None:
    """A pleural space along the apex and lateral wall, tapering to the base, bounded by a thin
    visceral pleural line, with no lung markings peripheral to it."""
    a, r, Y, px = s.a, s.rng, s.g.Y, s.g.px
    sg = int(r.choice([-1, 1]))
    depth_mm = float(np.exp(r.uniform(np.log(6), np.log(60)))) / (1.0 + 1.5 * s.subtle)
    sd = s.L.sd[0 if sg < 0 else 1]
    y_cp = a.dome_top(sg) + a.dome_h
    taper = np.clip((y_cp - 25 - Y) / (y_cp - a.y_apex), 0, 1) ** 0.6
    wsd = a.wall_sd(s.g.X, Y, sg)
    local = depth_mm * taper
    gap = local - wsd  # > 0 inside the pleural space
    s.ptx = _ramp(gap, max(1.0, px)) * _ramp(sd, max(1.0, px)) / (1.0 + s.subtle)  # partial: fainter when subtle
    s.vessel_keep *= 1 - s.ptx  # no lung tissue peripheral to the line: full air, no markings
    pleura = _line(gap, 0.7, px) * (local > 2.0) * (sd > 1.0)
    s.extra += 0.13 * min(1.3, s.cm) * pleura
    s.masks["pneumothorax"] = (gap > 0) & (sd > 0) & (local > 0.5)
    s.scores["pneumothorax"] = np.minimum(gap, sd)
    s.meta["pneumothorax_depth_mm"] = round(depth_mm, 1)
    s.meta["pneumothorax_side"] = "right" if sg < 0 else "left"


def _onto_rib(s: _Scene, nx: float, ny: float, sg: int, R: float) -> float:
    """The row (mm) of the posterior rib nearest ``(nx, ny)``, or ``ny`` if that is too close to
    the lung edge for a nodule of radius ``R``."""
    a = s.a
    u = abs(nx - a.xc) / a.W
    gq = -14.0 * u + 55.0 * u ** 2
    y0 = a.y_apex + 6.0
    kq = np.round((ny - gq - y0) / a.rib_sp)
    ny2 = y0 + gq + kq * a.rib_sp
    if a.lung_sd(np.array([nx]), np.array([ny2]), sg)[0] > R + 1:
        s.meta["nodule_over_rib"] = True
        return float(ny2)
    return ny


def _nodule(s: _Scene) -> None:
    """Projection of a lobulated sphere, 3-30 mm; small ones are faint and often over a rib. Its
    integrated density is kept when it is smaller than a pixel."""
    r, X, Y, px = s.rng, s.g.X, s.g.Y, s.g.px
    dmm = float(np.clip(np.exp(r.normal(np.log(16.0), 0.45)), 3.0, 20.0 if s.look_alike else 30.0))
    R = dmm / 2
    nx, ny, sg = _pick_point(s, R + 3.0)
    if dmm < 14 and r.random() < 0.45:  # over a posterior rib
        ny = _onto_rib(s, nx, ny, sg, R)
    rr = np.hypot(X - nx, Y - ny)
    chord = np.sqrt(np.clip(1 - (rr / R) ** 2, 0, 1)) * R  # half-chord, mm
    soft = max(0.6, px * 0.5)
    lobul = 1 + 0.15 * np.cos(3 * np.arctan2(Y - ny, X - nx) + r.uniform(0, 6.3))
    edge = _ramp((R * lobul - rr), soft)
    mass_ratio = min(1.0, (R / max(R, 0.6 * px)) ** 2)
    amp = 0.024 * s.cm * (0.7 + 0.3 * r.random())
    if R < 0.6 * px:
        nod = np.exp(-(rr ** 2) / (2 * (0.6 * px) ** 2)) * (2 / 3) * R * mass_ratio * 2.2
    else:
        nod = edge * np.maximum(chord, 0.35 * R)
    s.extra += amp * nod * (1.0 - 0.3 * s.L.heart_in)
    s.masks["nodule"] = rr <= max(R, 0.5 * px)
    s.scores["nodule"] = -rr
    s.meta["nodule_diameter_mm"] = round(dmm, 1)


def _cardiomegaly(s: _Scene) -> None:
    """The enlarged heart is drawn with the anatomy (its ratio is chosen before); only the mask here."""
    s.masks["cardiomegaly"] = s.L.hsd > 0
    s.scores["cardiomegaly"] = s.L.hsd


_DRAW_ORDER: tuple[tuple[str, Callable[[_Scene], None]], ...] = (
    ("effusion", _effusion), ("consolidation", _consolidation), ("pneumothorax", _pneumothorax),
    ("nodule", _nodule), ("cardiomegaly", _cardiomegaly),
)
"""The findings in drawing order: their draws from the findings stream follow this order."""


def _draw_findings(s: _Scene, labels: dict[str, bool]) -> None:
    """Draw every present finding into the scene."""
    for name, draw in _DRAW_ORDER:
        if labels[name]:
            draw(s)


MIMIC_RATES: dict[str, float] = {"nodule": 0.50, "consolidation": 0.50, "effusion": 0.50, "pneumothorax": 0.20}
"""Per finding, the chance at ``mimics=1`` that an image without the finding shows a look-alike of
it (the chance is ``mimics`` times this). The look-alikes are the classic mimics of chest
radiography: a nipple shadow, bone island or healed granuloma for a nodule; atelectasis or scarring
for consolidation; pleural thickening blunting the costophrenic angle for an effusion; a skin fold
for a pneumothorax. The reader's borderline cardiothoracic ratio is cardiomegaly's (drawn with the
anatomy at every ``mimics``)."""


def _draw_mimics(s: _Scene, labels: dict[str, bool], mimics: float, rng: np.random.Generator) -> list[str]:
    """Look-alikes of absent findings, drawn from their own stream ``rng``; their names.

    A look-alike is drawn by the finding's own function, so the image alone cannot always tell it
    from the finding, but it adds no label, mask, score or measurement. It is smaller than the
    finding can be: a nodule look-alike is at most 20 mm, pleural thickening blunts the angle with
    0.5 of an effusion's volume, atelectasis has 0.8 of a consolidation's radius. A skin fold keeps
    the lung markings beyond it and has no gas space: only the pleural-like line is drawn.
    """
    if mimics <= 0:
        return []
    drawn: list[str] = []
    finding_rng, s.rng, s.look_alike = s.rng, rng, True
    try:
        for name, draw in _DRAW_ORDER:
            u = rng.random()  # one draw per finding, present or not: the order of the draws is fixed
            if labels[name] or name not in MIMIC_RATES or u >= mimics * MIMIC_RATES[name]:
                continue
            masks, scores, meta, ptx, vessel_keep = dict(s.masks), dict(s.scores), dict(s.meta), s.ptx, s.vessel_keep.copy()
            draw(s)
            s.masks, s.scores, s.meta = masks, scores, meta
            if name == "pneumothorax":  # a skin fold: the line only
                s.ptx, s.vessel_keep = ptx, vessel_keep
            drawn.append(name)
    finally:
        s.rng, s.look_alike = finding_rng, False
    return drawn
