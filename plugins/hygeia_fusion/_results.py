"""From probabilities and heat maps to diagnoses: thresholds, regions, coded findings.

No torch here: :class:`~hygeia_fusion.plugin.FusionDiagnoser` and its frozen runner
(:class:`~hygeia_fusion._frozen.FrozenFusion`) both end in :func:`diagnoses`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hygeia.api import Diagnosis, Finding, ModelIdentity, Region


def heat_region(heat: np.ndarray, kind: Literal["point", "polygon"]) -> Region:
    """A region from a heat map ``[H, W]`` in [0, 1]: its peak (point), or the hull around it."""
    from scipy import ndimage

    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if kind == "point":
        return Region("point", ((float(c) + 0.5, float(r) + 0.5),))
    lab, _ = ndimage.label(heat >= 0.5 * float(heat[r, c]))
    rows, cols = np.nonzero(lab == lab[r, c])
    box = Region("box", ((float(cols.min()), float(rows.min())), (float(cols.max() + 1), float(rows.max() + 1))))
    if len(rows) < 2:
        return box
    pts = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    try:
        from scipy.spatial import ConvexHull

        hull = ConvexHull(pts)
    except Exception:  # collinear pixels: a box is the honest answer
        return box
    poly = [(float(pts[i, 0]), float(pts[i, 1])) for i in hull.vertices]
    return Region("polyline", tuple(poly + [poly[0]]))


def diagnoses(probs: np.ndarray, heat: np.ndarray | None, texts: Sequence[str] | None, model: Any,
              identity: ModelIdentity, heatmaps: bool = True) -> list[Diagnosis]:
    """One Diagnosis per image from ``probs`` ``[B, F]`` and heat maps ``[B, F, H, W]``; ``texts``
    (None: image-only) pick each image's thresholds (``model.thresholds`` with a non-empty text,
    else ``model.thresholds_no_text``); ``model`` also gives ``findings``, ``regions``, ``input_size``
    and ``codes``."""
    out: list[Diagnosis] = []
    codes = [model.codes[k] for k in model.findings]
    for b in range(len(probs)):
        fs: list[Finding] = []
        thresholds = model.thresholds if texts is not None and texts[b].strip() else model.thresholds_no_text
        for j, label in enumerate(model.findings):
            p, thr = float(probs[b, j]), float(thresholds[j])
            region = None
            if model.regions != "none" and p >= thr and heat is not None:
                kind = model.regions if model.regions != "auto" else ("point" if label == "nodule" else "polygon")
                region = heat_region(heat[b, j], kind)
            fs.append(Finding(label, codes[j], p, thr, region, heat[b, j] if heatmaps and heat is not None else None))
        out.append(Diagnosis(fs, identity, model.input_size))
    return out
