"""Drawing one phantom: :func:`make_phantom` (and :func:`phantom_labels_text`, its labels and text
without the image).

A phantom is drawn from eight child streams of ``SeedSequence(seed)``: labels, anatomy, findings,
text, noise, vessels, texture, look-alikes (``mimics``). The anatomy does not depend on the
findings (one seed is one patient); the order of the draws inside each stream is fixed, so a seed
always gives the same image. Steps: validate, choose the findings, draw the patient and the normal
layers (:mod:`.anatomy`), draw the findings and the look-alikes of absent ones (:mod:`.findings`),
compose the densities, display them (window, gamma, detector blur, noise), turn the masks into
regions, write the indication line (:mod:`.text`).

A private module of :mod:`hygeia_lab.phantoms` (its public names are re-exported there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from hygeia.api import Region
from hygeia.errors import InputError
from hygeia.vocab import FINDING_LABELS, NORMAL, finding

from ._geometry import FOV_MM
from .anatomy import _Anatomy, _grid, _normal_anatomy
from .findings import _draw_findings, _draw_mimics, _Scene
from .text import _clinical_text, sample_findings

DEFAULT_DIFFICULTY = 1.0
"""Default ``difficulty``, at which every shipped model was trained and measured (see
docs/phantoms.md). Higher is harder (fainter findings, more noise)."""


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


def _seq_children(seed: int) -> list[np.random.Generator]:
    """The eight streams of a seed: labels, anatomy, findings, text, noise, vessels, texture,
    look-alikes (the first seven are those of ``spawn(7)``, so ``mimics=0`` draws no look-alike stream into an image)."""
    ss = np.random.SeedSequence(int(seed))
    return [np.random.default_rng(c) for c in ss.spawn(8)]


def _check_findings(findings: Sequence[str] | None) -> list[str] | None:
    """Forced findings as canonical labels (``normal`` dropped); None: sample them."""
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


def _labels(r_lab: np.random.Generator, forced: list[str] | None) -> dict[str, bool]:
    """Every finding label: True for the forced ones, or for sampled ones (the stream is drawn either way)."""
    sampled = sample_findings(r_lab)
    chosen = sampled if forced is None else forced
    return {k: (k in chosen) for k in FINDING_LABELS}


def phantom_labels_text(seed: int, findings: Sequence[str] | None = None) -> tuple[dict[str, bool], str]:
    """The labels and clinical text :func:`make_phantom` gives ``seed``, without drawing the image (fast)."""
    forced = _check_findings(findings)
    r_lab, r_anat, _, r_text, *_ = _seq_children(int(seed))
    labels = _labels(r_lab, forced)
    a = _Anatomy(r_anat)
    return labels, _clinical_text(r_text, labels, a.age, a.female)


def _validate(seed: Any, size: Any, difficulty: Any, mimics: Any = 0.0) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise InputError("seed", "an integer in [0, 2**64)", got=repr(seed))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise InputError("size", "an integer number of pixels in [16, 1024]", got=repr(size))
    if not isinstance(difficulty, (int, float, np.floating)) or not 0.0 <= float(difficulty) <= 3.0:
        raise InputError("difficulty", "a number in [0, 3]", got=repr(difficulty))
    if isinstance(mimics, bool) or not isinstance(mimics, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(mimics) <= 1.0:
        raise InputError("mimics", "a number in [0, 1]", got=repr(mimics))


def _patient_meta(a: _Anatomy, ctr: float, diff: float) -> dict[str, Any]:
    return {
        "ctr": round(ctr, 4), "patient_size": round(a.s, 3), "rotation": round(a.rot, 4),
        "tilt_deg": round(float(np.rad2deg(a.tilt)), 2), "inspiration": round(a.insp, 3),
        "exposure": round(a.exposure, 3), "sex": "F" if a.female else "M", "age": a.age,
        "difficulty": diff, "fov_mm": FOV_MM, "synthetic": True,
    }


def make_phantom(
    seed: int,
    size: int = 64,
    findings: Sequence[str] | None = None,
    difficulty: float = DEFAULT_DIFFICULTY,
    mimics: float = 0.0,
) -> Phantom:
    """Draw one phantom; the same ``seed``, ``findings``, ``difficulty`` and ``mimics`` give the same image.

    ``findings=None`` samples findings with a realistic prevalence; ``[]`` or ``["normal"]``
    gives a normal image; ``["effusion", ...]`` exactly these (the anatomy does not depend on
    the findings: one seed is one patient). An unknown label raises InputError. ``mimics`` in
    [0, 1] scales the chance that an absent finding's look-alike is drawn
    (:data:`hygeia_lab.phantoms.MIMIC_RATES`); the labels, masks and text do not depend on it.
    """
    _validate(seed, size, difficulty, mimics)
    forced = _check_findings(findings)
    r_lab, r_anat, r_find, r_text, r_noise, r_vessel, r_tex, r_mimic = _seq_children(int(seed))
    labels = _labels(r_lab, forced)
    size, diff = int(size), float(difficulty)
    cm = 1.0 / (0.4 + 0.6 * diff)  # finding contrast multiplier

    a = _Anatomy(r_anat)
    ctr = a.ctr_normal
    if labels["cardiomegaly"]:
        ctr = 0.503 + min(0.2, 0.06 * a.ctr_excess * cm)
    meta = _patient_meta(a, ctr, diff)
    ctr_drawn = float(np.clip(ctr + a.ctr_jitter, 0.34, 0.75))  # the reader's CTR (the label) vs the drawn heart
    meta["ctr_drawn"] = round(ctr_drawn, 4)
    g = _grid(a, size)
    layers = _normal_anatomy(a, g, ctr_drawn, r_vessel, r_tex, diff)

    scene = _Scene(a, g, layers, r_find, cm, ctr_drawn, meta, subtle=max(0.0, diff - 1.0))
    _draw_findings(scene, labels)
    if mimics:
        meta["mimics"] = _draw_mimics(scene, labels, float(mimics), r_mimic)
    image = _display(a, _compose(scene), g.px, size, diff, r_noise)
    regions = _regions(scene.masks, scene.scores)
    text = _clinical_text(r_text, labels, a.age, a.female)
    return Phantom(image, labels, scene.masks, regions, text, (g.px, g.px), int(seed), meta)


def _compose(s: _Scene) -> np.ndarray:
    """Projected density: soft tissue, less the lung air left by the findings, plus the lung
    markings, bones, midline structures and the findings' own density."""
    L = s.L
    air_total = L.air * s.air_keep
    if s.ptx is not None:  # the pleural space: gas with no lung tissue, slightly darker than lung
        air_total = air_total * (1 - s.ptx) + s.ptx * np.maximum(air_total, 0.55) * (1.0 + 0.1 * min(s.cm, 1.5))
    return (L.D - 0.62 * air_total + L.vessels * s.vessel_keep * L.depth + L.texture * L.depth + L.broad * L.body_in
            + L.bone * (0.6 + 0.4 * L.body_in) + L.spine
            - 0.10 * L.trachea - 0.16 * L.bubble + s.a.breast * L.breast + s.extra)


def _display(a: _Anatomy, D: np.ndarray, px: float, size: int, diff: float, r_noise: np.random.Generator) -> np.ndarray:
    """Exposure-dependent window and gamma, detector blur, quantum and correlated noise: float32 in [0, 1]."""
    lo = a.lo + 0.02 * a.exposure
    hi = a.hi - 0.015 * a.exposure
    I = np.clip((D - lo) / (hi - lo), 0, 1) ** a.gamma
    sig_b = a.blur_mm / px
    if sig_b > 0.3:
        I = ndimage.gaussian_filter(I, sig_b, mode="nearest")
    noise_sd = 0.014 * (0.5 + 0.5 * diff) * np.exp(-0.15 * a.exposure) * np.sqrt(64.0 / size)
    noise = r_noise.standard_normal((size, size)) * noise_sd * (0.6 + 0.8 * I)
    corr = ndimage.gaussian_filter(r_noise.standard_normal((size, size)), max(1.0, 2.0 / px * 2), mode="wrap")
    corr *= noise_sd * 1.5 / max(float(corr.std()), 1e-6)
    return np.clip(I + noise + corr * 0.5, 0, 1).astype(np.float32)


def _regions(masks: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> dict[str, Region]:
    """A region per mask; a finding too small to cover a pixel centre gets its strongest pixel as its mask."""
    regions: dict[str, Region] = {}
    for name in list(masks):
        mk = masks[name]
        if not mk.any():
            mk = np.zeros_like(mk)
            mk[np.unravel_index(int(np.argmax(scores[name])), mk.shape)] = True
        masks[name] = mk
        regions[name] = _region_of(name, mk)
    return regions


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
