"""Synthetic chest-radiograph phantoms: seeded, labelled, with masks, regions and clinical text.

Every model metric in Hygeia is measured on these images, so they aim to be hard enough to mean
something. A phantom is drawn in continuous millimetre coordinates over a ~350 mm field of view
and rendered at any size: 64x64 and 128x128 of one seed show the same patient.

The image model is a projection radiograph in display convention (MONOCHROME2: dense is bright):

- anatomy: soft-tissue torso with shoulders, lung fields (apices, costophrenic angles, diaphragm
  domes, the right one higher), mediastinum with trachea and aortic knob, heart shadow whose
  transverse width is drawn from a cardiothoracic ratio, posterior and anterior ribs, clavicles,
  spine, breast shadows, gastric bubble, a branching pulmonary vessel tree and parenchymal texture;
- variation: patient size, centring, rotation (mediastinum shift) and tilt, inspiration depth
  (dome level, rib spacing, heart shape), exposure (window, gamma, noise), detector blur and
  quantum noise;
- findings (:data:`hygeia.vocab.FINDING_LABELS`): nodule (3-30 mm, small ones faint and often over
  a rib), consolidation (patchy, sometimes fissure-bounded, sometimes with air bronchograms),
  effusion (blunted costophrenic angle up to a meniscus), cardiomegaly (CTR > 0.5; normal hearts
  0.38-0.5), pneumothorax (thin visceral pleural line, no lung markings peripheral to it);
- a clinical indication line whose phrases depend on the findings through risk factors
  (fever and cough, smoking and malignancy, heart failure, lines and trauma) without ever naming
  a finding: informative, noisy, sometimes unrelated.

Thin structures are rendered with analytic anti-aliasing (a line keeps its integrated density
when it is thinner than a pixel), so small findings fade at low resolution the way they do when a
real radiograph is downsampled.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from hygeia.api import Region
from hygeia.errors import InputError
from hygeia.vocab import CHEST_FOV_MM, CONDITION_LABELS, FINDING_LABELS, NORMAL, finding

__all__ = [
    "DEFAULT_DIFFICULTY", "FOV_MM", "SPLITS", "Phantom", "PhantomSet", "make_phantom",
    "make_phantom_set", "class_conditional_set", "split_seeds", "save_npz", "load_npz", "sample_findings", "phantom_labels_text",
]

DEFAULT_DIFFICULTY = 1.0
"""Default ``difficulty``: tuned so that the image-only ``cnn`` scores per-finding AUROC of about
0.80-0.95 at 64x64 (see docs/phantoms.md). Higher is harder (fainter findings, more noise)."""

FOV_MM = CHEST_FOV_MM
"""Field of view (mm) of every phantom, whatever its size in pixels (:data:`hygeia.vocab.CHEST_FOV_MM`)."""

SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
"""Split names and their ids: split ``s`` image ``i`` has the seed drawn from
``SeedSequence([SPLITS[s], i])``, so held-out splits never reuse a training seed."""

# Prevalence of the number of findings per image (0, 1, 2, 3) and the weight of each finding.
_N_FINDINGS_P = np.array([0.50, 0.32, 0.13, 0.05])
_FINDING_W = {"nodule": 0.24, "consolidation": 0.26, "effusion": 0.20, "cardiomegaly": 0.18,
              "pneumothorax": 0.12}


# --------------------------------------------------------------------------- dataclasses
@dataclass
class Phantom:
    """One synthetic chest radiograph with its ground truth."""

    image: np.ndarray  # float32 [H, W] in [0, 1]
    labels: dict[str, bool]  # every FINDING_LABELS key
    masks: dict[str, np.ndarray]  # bool [H, W], present findings only
    regions: dict[str, Region]  # present findings only, DICOM (x=column, y=row) pixel coordinates
    text: str
    pixel_spacing: tuple[float, float]  # mm (row, column)
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)
    synthetic: bool = field(default=True, init=False)

    def label_vector(self) -> np.ndarray:
        """float32 ``[5]`` in :data:`FINDING_LABELS` order."""
        return np.array([float(self.labels[k]) for k in FINDING_LABELS], dtype=np.float32)


@dataclass
class PhantomSet:
    """A batch of phantoms as arrays (what training and evaluation use)."""

    images: np.ndarray  # float32 [N, 1, H, W]
    labels: np.ndarray  # float32 [N, 5]
    masks: np.ndarray  # bool [N, 5, H, W]
    texts: list[str]
    seeds: np.ndarray  # uint64 [N]
    split: str = ""
    difficulty: float = DEFAULT_DIFFICULTY

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: Any) -> "PhantomSet":
        idx = np.asarray(idx)
        return PhantomSet(self.images[idx], self.labels[idx], self.masks[idx],
                          [self.texts[i] for i in np.arange(len(self))[idx]], self.seeds[idx],
                          self.split, self.difficulty)


# --------------------------------------------------------------------------- helpers
def _ramp(sd: np.ndarray | float, soft: float) -> Any:
    """Anti-aliased step: 0 outside (sd < 0), 1 inside, linear over ``soft`` mm."""
    return np.clip(0.5 + np.asarray(sd) / soft, 0.0, 1.0)


def _line(d: np.ndarray, half_w: float, px: float) -> np.ndarray:
    """A line of width ``2*half_w`` mm at distance ``d``, keeping its integral when sub-pixel."""
    hb = max(half_w, px)
    return np.clip(1.0 - np.abs(d) / hb, 0.0, None) * (half_w / hb)


def _coarse_field(rng: np.random.Generator, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth random field on an ``n x n`` lattice over normalised coords ``u, v`` in [0, 1]."""
    lat = rng.standard_normal((n, n))
    coords = np.stack([np.clip(v, 0, 1) * (n - 1), np.clip(u, 0, 1) * (n - 1)])
    return ndimage.map_coordinates(lat, coords, order=3, mode="nearest")


def _smooth_field(rng: np.random.Generator, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _coarse_field(rng, n, u, v)


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


# --------------------------------------------------------------------------- anatomy
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


def _rib_layer(a: _Anatomy, X: np.ndarray, Y: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior and anterior ribs, clavicles; returns (bone density, posterior-rib centre distance)."""
    u = np.abs(X - a.xc) / a.W
    soft = max(0.8, px)
    # posterior ribs: y = y0 + g(u), periodic in y0
    g = -14.0 * u + 55.0 * u ** 2
    slope = (-14.0 + 110.0 * u) / a.W
    y0 = a.y_apex + 6.0
    ph = (Y - g - y0) / a.rib_sp
    k = np.round(ph)
    dy = (ph - k) * a.rib_sp / np.sqrt(1 + slope ** 2)
    half = 5.2 * a.s * (1 + 0.25 * u)
    valid = (k >= 0) & (k <= 9)
    ends = _ramp(u - 0.1, 0.05 * 1) * _ramp(1.04 - u, 0.06)
    band = _ramp(half - np.abs(dy), soft) * 0.55 + _line(np.abs(dy) - half, 0.9, px) * 1.2
    post = np.where(valid, band * ends, 0.0)
    # anterior ribs: descend medially from the lateral wall
    ya0 = a.y_apex + 6.0 + 31.0  # lateral end level of rib 0
    ga = 62.0 * np.clip(1.0 - u, 0, None) ** 1.15
    slope_a = 70.0 * (1.0 - np.clip(u, 0, 1)) ** 0.15 / a.W
    pha = (Y - ga - ya0) / a.rib_sp
    ka = np.round(pha)
    dya = (pha - ka) * a.rib_sp / np.sqrt(1 + slope_a ** 2)
    halfa = 6.5 * a.s
    valid_a = (ka >= 0) & (ka <= 5)
    ant = np.where(valid_a, _ramp(halfa - np.abs(dya), soft) * _ramp(u - 0.32, 0.05) * _ramp(1.0 - u, 0.05), 0.0) * 0.45
    # clavicles
    uc = np.abs(X - a.xc) / (0.95 * a.W)
    yc = a.clav_y - 20.0 * uc + 7.0 * np.sin(np.pi * np.clip(uc, 0, 1))
    clav = _ramp(6.5 * a.s - np.abs(Y - yc), soft) * _ramp(uc - 0.07, 0.04) * _ramp(1.0 - uc, 0.04)
    clav = clav * 0.9 + _line(np.abs(Y - yc) - 6.5 * a.s, 0.9, px) * 0.8 * (clav > 0)
    bone = a.rib_bright * (post + ant) + 0.14 * clav
    return bone, np.where(valid, np.abs(dy) - half, 99.0)


# --------------------------------------------------------------------------- labels and text
def sample_findings(rng: np.random.Generator) -> list[str]:
    """Findings of one image with a realistic, imbalanced prevalence (about half are normal)."""
    k = int(rng.choice(4, p=_N_FINDINGS_P))
    names = list(_FINDING_W)
    w = np.array([_FINDING_W[n] for n in names])
    chosen = list(rng.choice(names, size=k, replace=False, p=w / w.sum())) if k else []
    if "cardiomegaly" in chosen and "effusion" not in chosen and rng.random() < 0.3:
        chosen.append("effusion")  # heart failure: the two travel together
    return [str(c) for c in chosen]


_CLUES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # clue group: (findings it is linked to, phrases)
    "infection": (("consolidation",), (
        "fever and productive cough for {d} days", "cough, fever, raised CRP", "rigors and purulent sputum",
        "febrile, crackles on auscultation", "suspected chest infection", "cough and fever, not improving on antibiotics",
        "high temperature, right-sided chest pain on breathing", "sepsis, source unknown")),
    "malignancy": (("nodule",), (
        "current smoker, {p} pack-years", "ex-smoker, weight loss", "haemoptysis and weight loss",
        "history of colorectal cancer, staging", "known melanoma, restaging", "previous breast cancer, follow-up",
        "heavy smoker, persistent cough", "incidental density on abdominal CT, please assess")),
    "heart_failure": (("cardiomegaly", "effusion"), (
        "known congestive heart failure, worsening ankle swelling", "breathless on exertion, orthopnoea",
        "ischaemic cardiomyopathy, EF {ef}%", "bilateral leg oedema, raised BNP",
        "dilated cardiomyopathy, increasing breathlessness", "severe mitral regurgitation",
        "paroxysmal nocturnal dyspnoea", "heart failure clinic review")),
    "pleural": (("effusion",), (
        "reduced breath sounds at the base, stony dull percussion", "pleuritic pain, known ovarian cancer",
        "dull to percussion, decreased air entry", "chronic kidney disease, fluid overload")),
    "line_trauma": (("pneumothorax",), (
        "post central venous line insertion, check position", "fall from ladder, rib pain",
        "sudden pleuritic chest pain while at rest, tall and thin", "stab wound to the chest",
        "post CT-guided lung biopsy", "on mechanical ventilation, desaturation", "road traffic collision, chest wall tenderness",
        "post pacemaker insertion")),
}
_UNRELATED = (
    "pre-operative assessment", "routine health screening", "chest pain, ?cause", "shortness of breath",
    "follow-up", "fatigue", "post-operative day 2 after hip replacement", "asthma, wheeze", "dizziness",
    "pre-employment screening", "COPD review", "palpitations", "abdominal pain", "general malaise",
    "elevated D-dimer", "hypertension, annual review", "no history given",
)
_P_CLUE_TRUE, _P_CLUE_FALSE, _P_UNRELATED = 0.55, 0.09, 0.5


def _clinical_text(rng: np.random.Generator, labels: dict[str, bool], age: int, female: bool) -> str:
    phrases = []
    for linked, options in _CLUES.values():
        p = _P_CLUE_TRUE if any(labels[f] for f in linked) else _P_CLUE_FALSE
        if rng.random() < p:
            phrases.append(str(rng.choice(options)).format(d=rng.integers(2, 10), p=rng.integers(10, 60),
                                                           ef=rng.integers(20, 40)))
    if not phrases or rng.random() < _P_UNRELATED:
        phrases.append(str(rng.choice(_UNRELATED)))
    rng.shuffle(phrases)
    sex = "F" if female else "M"
    head = rng.choice([f"{age}{sex}. ", f"{age} y/o {'female' if female else 'male'}. ", f"{sex}, {age}. ", ""])
    text = head + "; ".join(phrases) + "."
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------- the renderer
def _seq_children(seed: int) -> list[np.random.Generator]:
    ss = np.random.SeedSequence(int(seed))
    return [np.random.default_rng(c) for c in ss.spawn(7)]


def _check_findings(findings: Sequence[str] | None) -> list[str] | None:
    if findings is None:
        return None
    if isinstance(findings, str):
        findings = [findings]
    out: list[str] = []
    for f in findings:
        ft = finding(f)
        if ft is NORMAL:
            continue
        if ft.label not in out:
            out.append(ft.label)
    return out


def phantom_labels_text(seed: int, findings: Sequence[str] | None = None) -> tuple[dict[str, bool], str]:
    """The labels and clinical text :func:`make_phantom` gives ``seed``, without drawing the image (fast)."""
    forced = _check_findings(findings)
    r_lab, r_anat, _, r_text, *_ = _seq_children(int(seed))
    sampled = sample_findings(r_lab)
    chosen = sampled if forced is None else forced
    labels = {k: (k in chosen) for k in FINDING_LABELS}
    a = _Anatomy(r_anat)
    return labels, _clinical_text(r_text, labels, a.age, a.female)


def make_phantom(
    seed: int,
    size: int = 64,
    findings: Sequence[str] | None = None,
    difficulty: float = DEFAULT_DIFFICULTY,
) -> Phantom:
    """Draw one phantom; the same ``seed``, ``findings`` and ``difficulty`` give the same image.

    ``findings=None`` samples findings with a realistic prevalence; ``[]`` or ``["normal"]``
    gives a normal image; ``["effusion", ...]`` exactly these (the anatomy does not depend on
    the findings: one seed is one patient). An unknown label raises InputError.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise InputError("seed", "an integer in [0, 2**64)", got=repr(seed))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise InputError("size", "an integer number of pixels in [16, 1024]", got=repr(size))
    if not isinstance(difficulty, (int, float, np.floating)) or not 0.0 <= float(difficulty) <= 3.0:
        raise InputError("difficulty", "a number in [0, 3]", got=repr(difficulty))
    forced = _check_findings(findings)
    r_lab, r_anat, r_find, r_text, r_noise, r_vessel, r_tex = _seq_children(int(seed))
    sampled = sample_findings(r_lab)
    chosen = sampled if forced is None else forced
    labels = {k: (k in chosen) for k in FINDING_LABELS}
    size = int(size)
    diff = float(difficulty)
    cm = 1.0 / (0.4 + 0.6 * diff)  # finding contrast multiplier
    px = FOV_MM / size

    a = _Anatomy(r_anat)
    ctr = a.ctr_normal
    if labels["cardiomegaly"]:
        ctr = 0.503 + min(0.2, 0.06 * a.ctr_excess * cm)
    meta: dict[str, Any] = {
        "ctr": round(ctr, 4), "patient_size": round(a.s, 3), "rotation": round(a.rot, 4),
        "tilt_deg": round(float(np.rad2deg(a.tilt)), 2), "inspiration": round(a.insp, 3),
        "exposure": round(a.exposure, 3), "sex": "F" if a.female else "M", "age": a.age,
        "difficulty": diff, "fov_mm": FOV_MM, "synthetic": True,
    }

    # pixel-centre coordinates in mm, rotated by the tilt into the patient frame
    g = (np.arange(size) + 0.5) * px - FOV_MM / 2
    Xi, Yi = np.meshgrid(g, g)
    ct, st = np.cos(a.tilt), np.sin(a.tilt)
    X, Y = ct * Xi + st * Yi, -st * Xi + ct * Yi
    U, V = (Xi + FOV_MM / 2) / FOV_MM, (Yi + FOV_MM / 2) / FOV_MM

    # body and soft tissue
    bw = (a.W + 30 * a.s) * (1 + 0.3 * _ramp(-118 * a.s + a.yc - Y, 40.0)) * (1 - 0.0000015 * (Y - 20) ** 2)
    body_u = np.abs(X - a.xc) / bw
    body_in = _ramp((1 - body_u) * bw, max(2.0, px))
    body_u = np.clip(body_u, 0, 1)
    body = body_in * (0.45 + 0.35 * np.sqrt(np.clip(1 - body_u ** 2, 0, 1)))
    neck = _ramp(-150 * a.s + a.yc - Y, 10.0) * _ramp(55 * a.s - np.abs(X - a.xm), 6.0) * 0.08
    D = body + neck

    # lungs
    sd = [a.lung_sd(X, Y, sg) for sg in (-1, 1)]
    lung_sd = np.maximum(sd[0], sd[1])
    lung_in = _ramp(lung_sd, max(1.2, px))
    depth = np.sqrt(np.clip(lung_sd / 28.0, 0, 1)) * lung_in
    ctr_drawn = float(np.clip(ctr + a.ctr_jitter, 0.34, 0.75))  # the reader's CTR (the label) vs the drawn heart
    meta["ctr_drawn"] = round(ctr_drawn, 4)
    r2h, hsd = a.heart_sd(X, Y, ctr_drawn)
    heart_in = _ramp(hsd, max(1.5, px))
    heart_th = np.sqrt(np.clip(1 - r2h, 0, 1))
    air = depth * (1 - 0.5 * heart_in - 0.25 * heart_th)
    if a.fat_pad:  # epicardial fat pad at the left cardiophrenic angle: widens the silhouette, not the heart
        fx, fy = a.xm + 0.71 * a.heart_width(ctr_drawn) - 6.0, a.dome_top(1) - 4.0
        rr = ((X - fx) / (14 + 14 * a.fat_pad)) ** 2 + ((Y - fy) / (14 + 10 * a.fat_pad)) ** 2
        air = air * (1 - 0.45 * np.clip(1 - rr, 0, 1) ** 0.5)

    # vessel tree from each hilum
    vp, vw = [], []
    for k, sg in enumerate((-1, 1)):
        base = np.deg2rad(np.array([-100.0, -60.0, -20.0, 15.0, 55.0, 90.0]))
        angles = np.where(sg > 0, base, np.pi - base) + r_vessel.normal(0, 0.15, base.size)
        p, w = _tree(r_vessel, np.array(a.hilum[k]), angles, 34.0 * a.s, 5.0, 5)
        vp.append(p), vw.append(w)
    vp_all, vw_all = np.concatenate(vp), np.concatenate(vw)
    # rotate vessel points into the image frame (the grid is rotated, the splat is not)
    vx = ct * vp_all[:, 0] - st * vp_all[:, 1]
    vy = st * vp_all[:, 0] + ct * vp_all[:, 1]
    vpts = np.stack([vx, vy], 1)
    big = vw_all > 2.0
    vessels = (_splat(vpts[big], vw_all[big] ** 2 * 1.8 / px, size, px, 1.6)
               + _splat(vpts[~big], vw_all[~big] ** 2 * 1.8 / px, size, px, 0.8))
    vessels = vessels * a.vessel_gain * 0.011 * _ramp(lung_sd - 2, 4.0)

    texture = _smooth_field(r_tex, 22, U, V) * 0.022 * (0.6 + 0.4 * diff)
    broad = _smooth_field(r_tex, 6, U, V) * 0.03

    bone, rib_dist = _rib_layer(a, X, Y, px)
    spine = _ramp(17 * a.s - np.abs(X - a.xc), max(1.5, px)) * (0.02 + 0.03 * np.cos(2 * np.pi * (Y - a.yc) / 27.0) ** 8)
    trachea = _ramp(7.5 * a.s - np.abs(X - a.xm - 0.04 * (Y + 60)), max(1.2, px)) * _ramp(-48 * a.s + a.yc - Y, 6.0)
    breast = np.zeros_like(D)
    if a.breast:
        for sg in (-1, 1):
            bx, by = a.xc + sg * 0.58 * a.W, a.y_dome - 5
            rr = ((X - bx) / (0.5 * a.W)) ** 2 + ((Y - by) / 60.0) ** 2
            breast += np.sqrt(np.clip(1 - rr, 0, 1)) * (Y > by - 30) * _ramp(by + 62 - Y, 4.0)
    bubble = np.zeros_like(D)
    if a.bubble:
        bx, by = a.bubble_xy
        rr = ((X - bx) / 22.0) ** 2 + ((Y - by) / 14.0) ** 2
        bubble = _ramp((1 - rr) * 10, max(1.0, px)) * (Y > by - 8)

    # ------------------------------------------------------------------ findings
    masks: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}  # where to put a one-pixel mask if a finding covers no pixel centre
    lung_mask = lung_sd > 0
    extra = np.zeros_like(D)  # added density (soft tissue replacing air)
    air_keep = np.ones_like(D)  # multiplier on lung air
    vessel_keep = np.ones_like(D)

    def pick_point(min_sd: float, tries: int = 200, side: int | None = None) -> tuple[float, float, int]:
        for _ in range(tries):
            sg = side if side is not None else int(r_find.choice([-1, 1]))
            x = a.xc + sg * r_find.uniform(0.1, 1.0) * a.W
            y = r_find.uniform(a.y_apex, a.dome_top(sg) + a.dome_h)
            xa, ya = np.array([x]), np.array([y])
            if a.lung_sd(xa, ya, sg)[0] > min_sd and a.heart_sd(xa, ya, ctr_drawn)[1][0] < -min_sd * 0.5:
                return x, y, sg
        return a.xc + sg * 0.5 * a.W, a.y_apex + 0.45 * (a.y_dome - a.y_apex), sg

    if labels["effusion"]:
        r = r_find.random()
        sides = [-1] if r < 0.4 else [1] if r < 0.75 else [-1, 1]
        vol = float(r_find.uniform(0, 1) ** 1.8)
        emask = np.zeros_like(lung_mask)
        for sg in sides:
            v = vol * (r_find.uniform(0.5, 1.0) if len(sides) > 1 else 1.0)
            y_cp = a.dome_top(sg) + a.dome_h  # costophrenic angle level
            h = 14 + 120 * v
            lam = 18 + 25 * v
            dl = a.d_lat(X, Y, sg)
            y_surf = y_cp - 0.55 * h + 12 - (0.45 * h) * np.exp(-np.clip(dl, 0, None) / lam)
            fluid = np.clip((Y - y_surf) / (10 + 18 * v), 0, 1) * _ramp(sd[0 if sg < 0 else 1] + 6, max(2, px))
            fluid *= 0.55 + 0.45 * min(1.0, cm)
            air_keep *= 1 - 0.97 * fluid
            vessel_keep *= 1 - fluid
            extra += 0.06 * fluid * _ramp(a.dome(X, sg) - Y + 8, 6.0)  # silhouette the dome
            emask |= (fluid > 0.25) & (sd[0 if sg < 0 else 1] > -4)
        masks["effusion"] = emask
        scores["effusion"] = 1 - air_keep
        meta["effusion_volume"] = round(vol, 3)
        meta["effusion_sides"] = ["right" if s < 0 else "left" for s in sides]

    if labels["consolidation"]:
        cx, cy, sg = pick_point(15.0)
        R = float(r_find.uniform(12, 58) * a.s)
        nb = int(r_find.integers(4, 10))
        fieldc = np.zeros_like(D)
        for _ in range(nb):
            bx, by = cx + r_find.normal(0, R * 0.5), cy + r_find.normal(0, R * 0.5)
            br = R * r_find.uniform(0.3, 0.7)
            fieldc += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * br ** 2))
        fieldc = fieldc * (0.75 + 0.5 * _smooth_field(r_find, 14, U, V))
        dens = float(r_find.uniform(0.2, 0.75)) * min(1.2, 0.35 + 0.65 * cm)
        op = np.clip((fieldc - 0.45) / 0.5, 0, 1) * dens
        if r_find.random() < 0.35:  # fissure-bounded: a sharp straight edge
            th = r_find.uniform(0, np.pi)
            nx, ny = np.cos(th), np.sin(th)
            op = op * _ramp((X - cx) * nx + (Y - cy) * ny + R * 0.3, max(1.0, px))
        op = op * _ramp(sd[0 if sg < 0 else 1], max(2.0, px))
        if dens > 0.5 and r_find.random() < 0.5:  # air bronchograms
            ang = np.arctan2(cy - a.hilum[(sg + 1) // 2][1], cx - a.hilum[(sg + 1) // 2][0])
            start = np.array([cx, cy]) - 0.6 * R * np.array([np.cos(ang), np.sin(ang)])
            bp, bwid = _tree(r_find, start, np.array([ang, ang + 0.4]), 0.45 * R, 3.0, 3, spread=0.35)
            bx = ct * bp[:, 0] - st * bp[:, 1]
            by_ = st * bp[:, 0] + ct * bp[:, 1]
            bron = _splat(np.stack([bx, by_], 1), bwid ** 2 * 2.0 / px, size, px, 0.7)
            op = op * (1 - np.clip(bron * 0.12, 0, 0.6))
            meta["air_bronchograms"] = True
        air_keep *= 1 - op
        vessel_keep *= 1 - np.clip(op * 1.3, 0, 1)
        masks["consolidation"] = op > 0.12 * dens
        scores["consolidation"] = op
        meta["consolidation_radius_mm"] = round(R, 1)

    if labels["pneumothorax"]:
        sg = int(r_find.choice([-1, 1]))
        depth_mm = float(np.exp(r_find.uniform(np.log(6), np.log(60))))
        k = 0 if sg < 0 else 1
        y_cp = a.dome_top(sg) + a.dome_h
        taper = np.clip((y_cp - 25 - Y) / (y_cp - a.y_apex), 0, 1) ** 0.6
        wsd = a.wall_sd(X, Y, sg)
        local = depth_mm * taper
        gap = local - wsd  # > 0 inside the pleural space
        ptx = _ramp(gap, max(1.0, px)) * _ramp(sd[k], max(1.0, px))
        # no lung tissue peripheral to the line: full air, no markings
        vessel_keep *= 1 - ptx
        pleura = _line(gap, 0.7, px) * (local > 2.0) * (sd[k] > 1.0)
        extra += 0.13 * min(1.3, cm) * pleura
        masks["pneumothorax"] = (gap > 0) & (sd[k] > 0) & (local > 0.5)
        scores["pneumothorax"] = np.minimum(gap, sd[k])
        meta["pneumothorax_depth_mm"] = round(depth_mm, 1)
        meta["pneumothorax_side"] = "right" if sg < 0 else "left"

    if labels["nodule"]:
        dmm = float(np.clip(np.exp(r_find.normal(np.log(16.0), 0.45)), 3.0, 30.0))
        R = dmm / 2
        nx, ny, sg = pick_point(R + 3.0)
        if dmm < 14 and r_find.random() < 0.45:  # over a posterior rib
            u = abs(nx - a.xc) / a.W
            gq = -14.0 * u + 55.0 * u ** 2
            y0 = a.y_apex + 6.0
            kq = np.round((ny - gq - y0) / a.rib_sp)
            ny2 = y0 + gq + kq * a.rib_sp
            if a.lung_sd(np.array([nx]), np.array([ny2]), sg)[0] > R + 1:
                ny = float(ny2)
                meta["nodule_over_rib"] = True
        rr = np.hypot(X - nx, Y - ny)
        chord = np.sqrt(np.clip(1 - (rr / R) ** 2, 0, 1)) * R  # half-chord, mm
        soft = max(0.6, px * 0.5)
        lobul = 1 + 0.15 * np.cos(3 * np.arctan2(Y - ny, X - nx) + r_find.uniform(0, 6.3))
        edge = _ramp((R * lobul - rr), soft)
        # integrated density kept when the nodule is smaller than a pixel
        mass_ratio = min(1.0, (R / max(R, 0.6 * px)) ** 2)
        amp = 0.024 * cm * (0.7 + 0.3 * r_find.random())
        if R < 0.6 * px:
            nod = np.exp(-(rr ** 2) / (2 * (0.6 * px) ** 2)) * (2 / 3) * R * mass_ratio * 2.2
        else:
            nod = edge * np.maximum(chord, 0.35 * R)
        extra += amp * nod * (1.0 - 0.3 * heart_in)
        masks["nodule"] = rr <= max(R, 0.5 * px)
        scores["nodule"] = -rr
        meta["nodule_diameter_mm"] = round(dmm, 1)

    if labels["cardiomegaly"]:
        masks["cardiomegaly"] = hsd > 0
        scores["cardiomegaly"] = hsd

    # ------------------------------------------------------------------ compose
    air_total = air * air_keep
    if labels["pneumothorax"]:  # the pleural space: gas with no lung tissue, slightly darker than lung
        air_total = air_total * (1 - ptx) + ptx * np.maximum(air_total, 0.55) * (1.0 + 0.1 * min(cm, 1.5))
    D = (D - 0.62 * air_total + vessels * vessel_keep * depth + texture * depth + broad * body_in
         + bone * (0.6 + 0.4 * body_in) + spine + 0.12 * heart_in * (1 - depth) * 0
         - 0.10 * trachea - 0.16 * bubble + a.breast * breast + extra)
    # display: exposure-dependent window and gamma, detector blur, quantum noise
    lo = a.lo + 0.02 * a.exposure
    hi = a.hi - 0.015 * a.exposure
    I = np.clip((D - lo) / (hi - lo), 0, 1) ** a.gamma
    sig_b = a.blur_mm / px
    if sig_b > 0.3:
        I = ndimage.gaussian_filter(I, sig_b, mode="nearest")
    noise_sd = 0.014 * (0.5 + 0.5 * diff) * np.exp(-0.15 * a.exposure) * np.sqrt(64.0 / size * (size / 64.0) ** 0.0)
    noise = r_noise.standard_normal((size, size)) * noise_sd * (0.6 + 0.8 * I)
    corr = ndimage.gaussian_filter(r_noise.standard_normal((size, size)), max(1.0, 2.0 / px * 2), mode="wrap")
    corr *= noise_sd * 1.5 / max(float(corr.std()), 1e-6)
    image = np.clip(I + noise + corr * 0.5, 0, 1).astype(np.float32)

    # ------------------------------------------------------------------ masks -> regions
    regions: dict[str, Region] = {}
    for name in list(masks):
        mk = masks[name]
        if not mk.any():  # a finding too small to cover a pixel centre: mark its strongest pixel
            mk = np.zeros_like(mk)
            mk[np.unravel_index(int(np.argmax(scores[name])), mk.shape)] = True
        masks[name] = mk
        regions[name] = _region_of(name, mk)
    text = _clinical_text(r_text, labels, a.age, a.female)
    return Phantom(image, labels, masks, regions, text, (px, px), int(seed), meta)


def _region_of(name: str, mask: np.ndarray) -> Region:
    """Box around the mask for nodule and cardiomegaly; the convex hull polygon otherwise."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    if name in ("nodule", "cardiomegaly") or len(rows) < 3:
        return Region("box", ((float(c0), float(r0)), (float(c1), float(r1))))
    # pixel corners of the mask, convex hull (x=column, y=row)
    pts = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    try:
        from scipy.spatial import ConvexHull

        hull = ConvexHull(pts)
        poly = [tuple(map(float, pts[i])) for i in hull.vertices]
    except Exception:  # degenerate (collinear) masks
        return Region("box", ((float(c0), float(r0)), (float(c1), float(r1))))
    return Region("polyline", tuple(poly + [poly[0]]))


# --------------------------------------------------------------------------- sets
def split_seeds(n: int, split: str = "train", start: int = 0) -> np.ndarray:
    """Seeds of images ``start .. start+n-1`` of a split (``SeedSequence([split_id, index])``)."""
    if split not in SPLITS:
        raise InputError("split", f"one of {', '.join(SPLITS)}", got=repr(split))
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = np.random.SeedSequence([SPLITS[split], start + i]).generate_state(1, np.uint64)[0]
    return out


def make_phantom_set(
    n: int,
    split: str = "train",
    size: int = 64,
    difficulty: float = DEFAULT_DIFFICULTY,
    progress: bool = False,
    findings: Sequence[str] | None = None,
    start: int = 0,
    workers: int = 1,
) -> PhantomSet:
    """``n`` phantoms of a split as arrays; images ``[N,1,H,W]``, labels ``[N,5]``, masks ``[N,5,H,W]``.

    ``workers > 1`` draws chunks in that many processes; the result is identical to ``workers=1``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InputError("n", "a positive integer", got=repr(n))
    seeds = split_seeds(int(n), split, start)
    if workers > 1 and n >= 64:
        return _parallel_set(seeds, split, size, difficulty, progress, findings, int(workers))
    images = np.empty((n, 1, size, size), np.float32)
    labels = np.zeros((n, len(FINDING_LABELS)), np.float32)
    masks = np.zeros((n, len(FINDING_LABELS), size, size), bool)
    texts: list[str] = []

    def work(i: int) -> None:
        p = make_phantom(int(seeds[i]), size=size, findings=findings, difficulty=difficulty)
        images[i, 0] = p.image
        labels[i] = p.label_vector()
        for j, k in enumerate(FINDING_LABELS):
            if k in p.masks:
                masks[i, j] = p.masks[k]
        texts.append(p.text)

    _loop(n, work, progress, f"phantoms ({split}, {size}x{size})")
    return PhantomSet(images, labels, masks, texts, seeds, split, float(difficulty))


def _chunk(args: tuple[np.ndarray, int, float, Sequence[str] | None]) -> tuple[np.ndarray, ...]:
    seeds, size, difficulty, findings = args
    ps = [make_phantom(int(s), size=size, findings=findings, difficulty=difficulty) for s in seeds]
    masks = np.zeros((len(ps), len(FINDING_LABELS), size, size), bool)
    for i, p in enumerate(ps):
        for j, k in enumerate(FINDING_LABELS):
            if k in p.masks:
                masks[i, j] = p.masks[k]
    return (np.stack([p.image for p in ps])[:, None], np.stack([p.label_vector() for p in ps]), masks,
            np.array([p.text for p in ps]))


def _parallel_set(seeds: np.ndarray, split: str, size: int, difficulty: float, progress: bool,
                  findings: Sequence[str] | None, workers: int) -> PhantomSet:
    from concurrent.futures import ProcessPoolExecutor

    chunks = [seeds[i:i + 256] for i in range(0, len(seeds), 256)]
    parts: list[tuple[np.ndarray, ...]] = []
    with ProcessPoolExecutor(workers) as ex:
        results = ex.map(_chunk, [(c, size, difficulty, findings) for c in chunks])
        it = iter(results)
        _loop(len(chunks), lambda i: parts.append(next(it)), progress,
              f"phantoms ({split}, {size}x{size}, {workers} workers, chunks of 256)")
    return PhantomSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts]), [str(t) for p in parts for t in p[3]], seeds, split,
                      float(difficulty))


def _loop(n: int, fn: Callable[[int], None], progress: bool, what: str) -> None:
    if not progress:
        for i in range(n):
            fn(i)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(what, total=n)
        for i in range(n):
            fn(i)
            bar.advance(task)


def save_npz(path: str | os.PathLike[str], phantom_set: PhantomSet) -> Path:
    """Write a PhantomSet atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, images=phantom_set.images, labels=phantom_set.labels, masks=phantom_set.masks,
                            texts=np.array(phantom_set.texts, dtype=str), seeds=phantom_set.seeds,
                            split=np.array(phantom_set.split), difficulty=np.array(phantom_set.difficulty),
                            finding_labels=np.array(FINDING_LABELS), synthetic=np.array(True))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz(path: str | os.PathLike[str]) -> PhantomSet:
    """Read a PhantomSet written by :func:`save_npz`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if tuple(str(s) for s in z["finding_labels"]) != FINDING_LABELS:
                raise InputError(str(path), f"a phantom set with findings {FINDING_LABELS}")
            return PhantomSet(z["images"], z["labels"], z["masks"], [str(t) for t in z["texts"]], z["seeds"],
                              str(z["split"]), float(z["difficulty"]))
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(path), "a phantom .npz written by hygeia_lab.phantoms.save_npz", got=str(exc)[:200]) from None


def class_conditional_set(n_per_class: int, size: int = 64, cache: str | Path | None = None,
                          progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A class-conditional training set: images ``[N, 1, size, size]``, condition indices ``[N]``
    (into ``hygeia.vocab.CONDITION_LABELS``).

    Label ``k`` uses training-split seeds ``k*n .. (k+1)*n - 1`` with ``findings=[label]``, so each
    condition is clean and no two conditions share a patient. ``cache``: a folder for the .npz files.
    """
    images, conds = [], []
    for k, label in enumerate(CONDITION_LABELS):
        f = Path(cache) / f"train_{label}_{n_per_class}_{size}.npz" if cache else None
        if f is not None and f.is_file():
            ps = load_npz(f)
        else:
            ps = make_phantom_set(n_per_class, split="train", size=size, findings=[label], start=k * n_per_class,
                                  progress=progress)
            if f is not None:
                save_npz(f, ps)
        images.append(ps.images)
        conds.append(np.full(len(ps), k, np.int64))
    return np.concatenate(images), np.concatenate(conds)
