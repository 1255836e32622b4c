"""The model of ``example-intensity``: six regional mean intensities (upper and lower lung zones on
each side, heart, costophrenic angles) that feed a logistic regression per finding."""
from __future__ import annotations

import numpy as np

# Regions as (row0, row1, col0, col1) fractions of the image.
ZONES = ((0.2, 0.5, 0.1, 0.45), (0.2, 0.5, 0.55, 0.9), (0.5, 0.8, 0.1, 0.45), (0.5, 0.8, 0.55, 0.9),
         (0.45, 0.8, 0.35, 0.7), (0.75, 0.95, 0.05, 0.95))


def features(images: np.ndarray) -> np.ndarray:
    """[B, 1, H, W] -> [B, 6] zone means."""
    _, _, h, w = images.shape
    return np.stack([images[:, 0, int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)].mean(axis=(1, 2))
                     for r0, r1, c0, c1 in ZONES], axis=1).astype(np.float32)
