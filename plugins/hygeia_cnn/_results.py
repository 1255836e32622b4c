"""From probabilities and heat maps to diagnoses: thresholds, regions, coded findings.

No torch here: :class:`~hygeia_cnn.plugin.CnnDiagnoser` and its frozen runner
(:class:`~hygeia_cnn._frozen.FrozenCnn`) both end in :func:`diagnoses`."""
from __future__ import annotations

from typing import Any

import numpy as np

from hygeia.api import Diagnosis, Finding, ModelIdentity, Region


def region_from_heatmap(heat: np.ndarray, level: float = 0.5) -> Region | None:
    """A box (DICOM x=column, y=row pixel coordinates) around the blob holding the heat map's maximum."""
    from scipy import ndimage

    if not np.isfinite(heat).all() or heat.max() <= 0:
        return None
    lab, _ = ndimage.label(heat >= level * heat.max())
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = np.nonzero(lab == lab[r, c])
    return Region("box", ((float(cols.min()), float(rows.min())), (float(cols.max() + 1), float(rows.max() + 1))))


def diagnoses(probs: np.ndarray, maps: np.ndarray | None, want: bool | str, model: Any,
              identity: ModelIdentity) -> list[Diagnosis]:
    """One Diagnosis per image from ``probs`` ``[B, F]`` and ``maps`` ``[B, F, H, W]`` (None: no
    maps); ``want`` ``"present"``: only the present findings' maps are kept; ``model`` gives
    ``findings``, ``thresholds``, ``codes`` and ``input_size``."""
    present = np.asarray(probs, np.float64) >= model.thresholds[None, :]
    out = []
    for b in range(len(probs)):
        fs = []
        for k, label in enumerate(model.findings):
            p, t = float(probs[b, k]), float(model.thresholds[k])
            heat = None if maps is None or (want == "present" and not present[b, k]) else maps[b, k]
            region = region_from_heatmap(heat) if heat is not None and p >= t else None
            fs.append(Finding(label, model.codes[label], p, t, region, heat))
        out.append(Diagnosis(fs, identity, model.input_size))
    return out
