"""The normal anatomy of a phantom: the drawn patient (:class:`_Anatomy`), the pixel grid in the
patient frame, and the layers of a normal chest (body, lungs, heart, vessels, texture, bones,
spine, trachea, breasts, gastric bubble).

A private module of :mod:`hygeia_lab.phantoms`. Everything is in millimetres, origin at the image
centre, y downwards; ``sg`` is the side (-1: image left = patient right, +1: patient left).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._geometry import FOV_MM, _line, _ramp, _smooth_field, _splat, _to_image_frame, _tree


class _Anatomy:
    """Drawn parameters of one patient, in mm (origin at the image centre, y downwards)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.s = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.14))  # patient size
        self.W = 124.0 * self.s  # half inner thoracic width at the domes
        self.xc = float(rng.normal(0, 6))  # centring
        self.yc = float(rng.normal(0, 7))
        self.rot = float(np.clip(rng.normal(0, 0.035), -0.09, 0.09))  # rotation: mediastinal shift
        self.xm = self.xc + self.rot * self.W
        self.tilt = float(np.deg2rad(rng.normal(0, 2.0)))
        self.insp = float(rng.uniform(-1, 1))  # inspiration depth
        self.y_apex = -132.0 * self.s + self.yc + rng.normal(0, 4)
        self.y_dome = 56.0 * self.s + 17.0 * self.insp + self.yc  # right dome top
        self.dome_h = 24.0 + 8.0 * rng.random()  # dome height above the costophrenic angles
        self.left_drop = float(rng.uniform(8, 22))  # left dome lower than the right
        self.clav_y = self.y_apex + rng.normal(8, 6)
        self.female = bool(rng.random() < 0.5)
        self.age = int(np.clip(rng.normal(58, 17), 18, 95))
        self.bubble = bool(rng.random() < 0.6)
        self.bubble_xy = (self.xc + 0.45 * self.W + rng.normal(0, 8), self.y_dome + self.left_drop + 28 + rng.normal(0, 6))
        # heart: both a normal and an enlarged CTR are drawn; the label picks one
        self.ctr_normal = float(0.497 - 0.117 * rng.beta(1.4, 2.2))  # 0.38-0.497, most near 0.46
        self.ctr_excess = float(rng.beta(1.2, 4.0))  # enlarged: 0.503 + 0.12 * excess / difficulty
        self.heart_tilt = float(np.deg2rad(rng.uniform(15, 45) - 8 * self.insp))
        self.heart_aspect = float(rng.uniform(0.72, 0.98))
        self.fat_pad = float(rng.uniform(0.0, 1.0)) if rng.random() < 0.4 else 0.0  # cardiophrenic fat pad
        self.ctr_jitter = float(rng.normal(0.0, 0.014))
        self.knob_r = float(rng.uniform(10, 17) * self.s)
        self.exposure = float(rng.normal(0, 1))
        self.gamma = float(rng.uniform(0.85, 1.2))
        self.lo = float(0.04 + 0.025 * rng.normal())
        self.hi = float(0.93 + 0.04 * rng.normal())
        self.blur_mm = float(rng.uniform(0.5, 1.2))
        self.rib_sp = (self.y_dome - self.y_apex) / rng.uniform(8.6, 9.6)
        self.rib_bright = float(rng.uniform(0.08, 0.13))
        self.vessel_gain = float(rng.uniform(0.8, 1.2))
        self.breast = float(rng.uniform(0.05, 0.12)) if self.female else 0.0
        self.hilum = [(self.xm + sg * (40.0 + rng.normal(0, 4)) * self.s,
                       -20.0 + self.yc + (-10.0 if sg > 0 else 0.0) + rng.normal(0, 5)) for sg in (-1, 1)]

    # lung boundary: signed distance-like (mm, > 0 inside), per side (-1 image left = patient right)
    def lat_half(self, Y: np.ndarray) -> np.ndarray:
        t = np.clip((Y - self.y_apex) / (self.y_dome - self.y_apex), 0, 1.2)
        return self.W * (0.7 + 0.3 * np.sqrt(t))

    def dome_top(self, sg: int) -> float:
        return self.y_dome + (self.left_drop if sg > 0 else 0.0)

    def dome(self, X: np.ndarray, sg: int) -> np.ndarray:
        xd = self.xc + sg * 0.42 * self.W
        return self.dome_top(sg) + self.dome_h * ((X - xd) / (0.58 * self.W)) ** 2

    def d_lat(self, X: np.ndarray, Y: np.ndarray, sg: int) -> np.ndarray:
        return self.lat_half(Y) - sg * (X - self.xc)

    def d_apex(self, X: np.ndarray, Y: np.ndarray, sg: int) -> np.ndarray:
        xa = self.xc + sg * 0.42 * self.W
        return (Y - (self.y_apex + 0.018 / self.s * (X - xa) ** 2)) * 0.8

    def d_med(self, X: np.ndarray, Y: np.ndarray, sg: int) -> np.ndarray:
        half = (19.0 + 9.0 * _ramp(-70 + self.yc - Y, 30.0)) * self.s
        d = sg * (X - self.xm) - half
        if sg > 0:  # aortic knob bulges into the left lung
            kx, ky = self.xm + 24 * self.s, -72 * self.s + self.yc
            d = np.minimum(d, np.hypot(X - kx, Y - ky) - self.knob_r)
        return d

    def lung_sd(self, X: np.ndarray, Y: np.ndarray, sg: int) -> np.ndarray:
        return np.minimum(np.minimum(self.d_lat(X, Y, sg), self.d_apex(X, Y, sg)),
                          np.minimum(self.d_med(X, Y, sg), self.dome(X, sg) - Y))

    def wall_sd(self, X: np.ndarray, Y: np.ndarray, sg: int) -> np.ndarray:
        """Distance to the chest wall (lateral and apical boundary), where a pneumothorax gathers."""
        return np.minimum(self.d_lat(X, Y, sg), self.d_apex(X, Y, sg))

    def heart_width(self, ctr: float) -> float:
        return ctr * 2.0 * self.W

    def heart_sd(self, X: np.ndarray, Y: np.ndarray, ctr: float) -> tuple[np.ndarray, np.ndarray]:
        """(inside-ness r^2 of the heart ellipse, signed distance approx, mm > 0 inside)."""
        hw = self.heart_width(ctr)
        c, s = np.cos(self.heart_tilt), np.sin(self.heart_tilt)
        A = hw / 2 / np.sqrt(c ** 2 + self.heart_aspect ** 2 * s ** 2)
        B = self.heart_aspect * A
        # horizontal extent of the rotated ellipse: centre so that 1/3 lies right of the midline
        hx = self.xm + hw * (0.5 - 0.29)
        hy = self.y_dome + self.left_drop + 16 - 0.85 * np.sqrt((A * s) ** 2 + (B * c) ** 2)
        dx, dy = X - hx, Y - hy
        u = (c * dx + s * dy) / A
        v = (-s * dx + c * dy) / B
        r2 = u * u + v * v
        return r2, (1 - np.sqrt(r2)) * B


@dataclass
class _Grid:
    """Pixel centres in mm, rotated by the patient's tilt into the patient frame (``X, Y``), and
    normalised image coordinates ``U, V`` in [0, 1]; ``ct, st``: cosine and sine of the tilt."""

    size: int
    px: float  # pixel spacing, mm
    X: np.ndarray
    Y: np.ndarray
    U: np.ndarray
    V: np.ndarray
    ct: float
    st: float


def _grid(a: _Anatomy, size: int) -> _Grid:
    px = FOV_MM / size
    g = (np.arange(size) + 0.5) * px - FOV_MM / 2
    Xi, Yi = np.meshgrid(g, g)
    ct, st = np.cos(a.tilt), np.sin(a.tilt)
    X, Y = ct * Xi + st * Yi, -st * Xi + ct * Yi
    U, V = (Xi + FOV_MM / 2) / FOV_MM, (Yi + FOV_MM / 2) / FOV_MM
    return _Grid(size, px, X, Y, U, V, ct, st)


@dataclass
class _Layers:
    """The normal chest of one patient, before findings (arrays ``[size, size]``)."""

    D: np.ndarray  # soft-tissue density: body and neck
    body_in: np.ndarray  # inside the body (0-1)
    sd: list[np.ndarray]  # lung signed distance (mm, > 0 inside) per side: [right (sg=-1), left (sg=+1)]
    lung_sd: np.ndarray  # both lungs
    depth: np.ndarray  # lung depth, 0 at the edges, 1 inside
    hsd: np.ndarray  # heart signed distance (mm, > 0 inside)
    heart_in: np.ndarray
    air: np.ndarray  # lung air, less the heart and the fat pad
    vessels: np.ndarray
    texture: np.ndarray  # parenchymal texture
    broad: np.ndarray  # broad soft-tissue variation
    bone: np.ndarray  # ribs and clavicles
    spine: np.ndarray
    trachea: np.ndarray
    breast: np.ndarray
    bubble: np.ndarray


def _posterior_ribs(a: _Anatomy, X: np.ndarray, Y: np.ndarray, px: float, soft: float) -> np.ndarray:
    """Posterior ribs: ``y = y0 + g(u)``, periodic in ``y0``, with cortical rims."""
    u = np.abs(X - a.xc) / a.W
    g = -14.0 * u + 55.0 * u ** 2
    slope = (-14.0 + 110.0 * u) / a.W
    y0 = a.y_apex + 6.0
    ph = (Y - g - y0) / a.rib_sp
    k = np.round(ph)
    dy = (ph - k) * a.rib_sp / np.sqrt(1 + slope ** 2)
    half = 5.2 * a.s * (1 + 0.25 * u)
    valid = (k >= 0) & (k <= 9)
    ends = _ramp(u - 0.1, 0.05) * _ramp(1.04 - u, 0.06)
    band = _ramp(half - np.abs(dy), soft) * 0.55 + _line(np.abs(dy) - half, 0.9, px) * 1.2
    return np.where(valid, band * ends, 0.0)


def _anterior_ribs(a: _Anatomy, X: np.ndarray, Y: np.ndarray, soft: float) -> np.ndarray:
    """Anterior ribs: they descend medially from the lateral wall."""
    u = np.abs(X - a.xc) / a.W
    ya0 = a.y_apex + 6.0 + 31.0  # lateral end level of rib 0
    ga = 62.0 * np.clip(1.0 - u, 0, None) ** 1.15
    slope_a = 70.0 * (1.0 - np.clip(u, 0, 1)) ** 0.15 / a.W
    pha = (Y - ga - ya0) / a.rib_sp
    ka = np.round(pha)
    dya = (pha - ka) * a.rib_sp / np.sqrt(1 + slope_a ** 2)
    halfa = 6.5 * a.s
    valid_a = (ka >= 0) & (ka <= 5)
    return np.where(valid_a, _ramp(halfa - np.abs(dya), soft) * _ramp(u - 0.32, 0.05) * _ramp(1.0 - u, 0.05), 0.0) * 0.45


def _rib_layer(a: _Anatomy, X: np.ndarray, Y: np.ndarray, px: float) -> np.ndarray:
    """Bone density of the posterior and anterior ribs and the clavicles."""
    soft = max(0.8, px)
    post = _posterior_ribs(a, X, Y, px, soft)
    ant = _anterior_ribs(a, X, Y, soft)
    uc = np.abs(X - a.xc) / (0.95 * a.W)
    yc = a.clav_y - 20.0 * uc + 7.0 * np.sin(np.pi * np.clip(uc, 0, 1))
    clav = _ramp(6.5 * a.s - np.abs(Y - yc), soft) * _ramp(uc - 0.07, 0.04) * _ramp(1.0 - uc, 0.04)
    clav = clav * 0.9 + _line(np.abs(Y - yc) - 6.5 * a.s, 0.9, px) * 0.8 * (clav > 0)
    return a.rib_bright * (post + ant) + 0.14 * clav


def _body(a: _Anatomy, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Torso with shoulders, and the neck: (soft-tissue density, inside-the-body)."""
    X, Y = g.X, g.Y
    bw = (a.W + 30 * a.s) * (1 + 0.3 * _ramp(-118 * a.s + a.yc - Y, 40.0)) * (1 - 0.0000015 * (Y - 20) ** 2)
    body_u = np.abs(X - a.xc) / bw
    body_in = _ramp((1 - body_u) * bw, max(2.0, g.px))
    body_u = np.clip(body_u, 0, 1)
    body = body_in * (0.45 + 0.35 * np.sqrt(np.clip(1 - body_u ** 2, 0, 1)))
    neck = _ramp(-150 * a.s + a.yc - Y, 10.0) * _ramp(55 * a.s - np.abs(X - a.xm), 6.0) * 0.08
    return body + neck, body_in


def _lungs_and_heart(a: _Anatomy, g: _Grid, ctr_drawn: float) -> dict[str, Any]:
    """Lung fields, the heart drawn at ``ctr_drawn``, and the lung air they leave."""
    X, Y, px = g.X, g.Y, g.px
    sd = [a.lung_sd(X, Y, sg) for sg in (-1, 1)]
    lung_sd = np.maximum(sd[0], sd[1])
    lung_in = _ramp(lung_sd, max(1.2, px))
    depth = np.sqrt(np.clip(lung_sd / 28.0, 0, 1)) * lung_in
    r2h, hsd = a.heart_sd(X, Y, ctr_drawn)
    heart_in = _ramp(hsd, max(1.5, px))
    heart_th = np.sqrt(np.clip(1 - r2h, 0, 1))
    air = depth * (1 - 0.5 * heart_in - 0.25 * heart_th)
    if a.fat_pad:  # epicardial fat pad at the left cardiophrenic angle: widens the silhouette, not the heart
        fx, fy = a.xm + 0.71 * a.heart_width(ctr_drawn) - 6.0, a.dome_top(1) - 4.0
        rr = ((X - fx) / (14 + 14 * a.fat_pad)) ** 2 + ((Y - fy) / (14 + 10 * a.fat_pad)) ** 2
        air = air * (1 - 0.45 * np.clip(1 - rr, 0, 1) ** 0.5)
    return {"sd": sd, "lung_sd": lung_sd, "depth": depth, "hsd": hsd, "heart_in": heart_in, "air": air}


def _vessels(a: _Anatomy, g: _Grid, rng: np.random.Generator, lung_sd: np.ndarray) -> np.ndarray:
    """A branching pulmonary vessel tree from each hilum, faded at the lung edges."""
    vp, vw = [], []
    for k, sg in enumerate((-1, 1)):
        base = np.deg2rad(np.array([-100.0, -60.0, -20.0, 15.0, 55.0, 90.0]))
        angles = np.where(sg > 0, base, np.pi - base) + rng.normal(0, 0.15, base.size)
        p, w = _tree(rng, np.array(a.hilum[k]), angles, 34.0 * a.s, 5.0, 5)
        vp.append(p), vw.append(w)
    vpts = _to_image_frame(np.concatenate(vp), g.ct, g.st)
    vw_all = np.concatenate(vw)
    big = vw_all > 2.0
    size, px = g.size, g.px
    vessels = (_splat(vpts[big], vw_all[big] ** 2 * 1.8 / px, size, px, 1.6)
               + _splat(vpts[~big], vw_all[~big] ** 2 * 1.8 / px, size, px, 0.8))
    return vessels * a.vessel_gain * 0.011 * _ramp(lung_sd - 2, 4.0)


def _midline_and_soft(a: _Anatomy, g: _Grid) -> dict[str, np.ndarray]:
    """Spine, trachea, breast shadows and the gastric bubble."""
    X, Y, px = g.X, g.Y, g.px
    spine = _ramp(17 * a.s - np.abs(X - a.xc), max(1.5, px)) * (0.02 + 0.03 * np.cos(2 * np.pi * (Y - a.yc) / 27.0) ** 8)
    trachea = _ramp(7.5 * a.s - np.abs(X - a.xm - 0.04 * (Y + 60)), max(1.2, px)) * _ramp(-48 * a.s + a.yc - Y, 6.0)
    breast = np.zeros_like(X)
    if a.breast:
        for sg in (-1, 1):
            bx, by = a.xc + sg * 0.58 * a.W, a.y_dome - 5
            rr = ((X - bx) / (0.5 * a.W)) ** 2 + ((Y - by) / 60.0) ** 2
            breast += np.sqrt(np.clip(1 - rr, 0, 1)) * (Y > by - 30) * _ramp(by + 62 - Y, 4.0)
    bubble = np.zeros_like(X)
    if a.bubble:
        bx, by = a.bubble_xy
        rr = ((X - bx) / 22.0) ** 2 + ((Y - by) / 14.0) ** 2
        bubble = _ramp((1 - rr) * 10, max(1.0, px)) * (Y > by - 8)
    return {"spine": spine, "trachea": trachea, "breast": breast, "bubble": bubble}


def _normal_anatomy(a: _Anatomy, g: _Grid, ctr_drawn: float, r_vessel: np.random.Generator,
                    r_tex: np.random.Generator, diff: float) -> _Layers:
    """Every layer of the normal chest; ``r_vessel`` draws the vessel tree, ``r_tex`` the texture."""
    D, body_in = _body(a, g)
    lungs = _lungs_and_heart(a, g, ctr_drawn)
    vessels = _vessels(a, g, r_vessel, lungs["lung_sd"])
    texture = _smooth_field(r_tex, 22, g.U, g.V) * 0.022 * (0.6 + 0.4 * diff)
    broad = _smooth_field(r_tex, 6, g.U, g.V) * 0.03
    bone = _rib_layer(a, g.X, g.Y, g.px)
    return _Layers(D=D, body_in=body_in, vessels=vessels, texture=texture, broad=broad, bone=bone,
                   **lungs, **_midline_and_soft(a, g))
