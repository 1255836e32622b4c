"""Training data of the ``gan`` (used by :mod:`hygeia_gan.train` only): phantoms with exactly one
condition each, and the text prompts the ``text`` conditioner is trained on.

For every condition of :data:`hygeia.vocab.CONDITION_LABELS` ('normal' and the five findings)
``n_per_condition`` phantoms of the ``train`` split are drawn with that finding forced on and the
others off; condition ``k`` uses image indices ``k*n .. (k+1)*n - 1`` so no patient repeats. The
set depends only on ``n_per_condition`` (and the phantom generator's version), never on the
training seed; it can be cached as an .npz (written atomically by :func:`hygeia_lab.phantoms.save_npz`).

Text prompts: every prefix of :data:`PREFIXES` with every phrase of :data:`PHRASES` (120 prompts,
20 per condition).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hygeia_lab import PhantomSet, load_npz, make_phantom_set, save_npz
from hygeia.vocab import CONDITION_LABELS

# Prompts used to train text conditioning: prefix + phrase, for each condition.
PHRASES: dict[str, tuple[str, ...]] = {
    "normal": ("normal chest", "no acute cardiopulmonary abnormality", "clear lungs and a normal heart size",
               "unremarkable chest", "no finding"),
    "nodule": ("a pulmonary nodule", "a solitary lung nodule", "a small rounded opacity in the lung",
               "a lung mass", "a nodule"),
    "consolidation": ("lung consolidation", "airspace opacity", "patchy consolidation in keeping with pneumonia",
                      "lobar pneumonia", "consolidation"),
    "effusion": ("a pleural effusion", "a blunted costophrenic angle", "pleural fluid with a meniscus",
                 "an effusion", "effusion"),
    "cardiomegaly": ("cardiomegaly", "an enlarged heart", "a cardiothoracic ratio above 0.5",
                     "enlarged cardiac silhouette", "cardiac enlargement"),
    "pneumothorax": ("a pneumothorax", "a visible pleural line with absent lung markings", "a collapsed lung",
                     "pneumothorax", "air in the pleural space"),
}
PREFIXES: tuple[str, ...] = ("", "chest radiograph with ", "frontal chest x-ray showing ", "findings: ")


def prompts() -> list[tuple[int, str]]:
    """(condition index, prompt) pairs the text conditioning is trained on."""
    return [(k, p + s) for k, c in enumerate(CONDITION_LABELS) for s in PHRASES[c] for p in PREFIXES]


def conditional_set(n_per_condition: int, split: str = "train", size: int = 64, start: int = 0,
                    progress: bool = True, cache: str | Path | None = None) -> tuple[PhantomSet, np.ndarray]:
    """Phantoms and their condition index into CONDITION_LABELS (``int64 [N]``)."""
    if cache is not None and Path(cache).is_file():
        ps = load_npz(cache)
        if len(ps) == n_per_condition * len(CONDITION_LABELS):
            return ps, np.repeat(np.arange(len(CONDITION_LABELS)), n_per_condition)
    parts = []
    for k, label in enumerate(CONDITION_LABELS):
        findings = [] if label == "normal" else [label]
        parts.append(make_phantom_set(n_per_condition, split=split, size=size, findings=findings,
                                      start=start + k * n_per_condition, progress=progress))
    ps = PhantomSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                    np.concatenate([p.masks for p in parts]), [t for p in parts for t in p.texts],
                    np.concatenate([p.seeds for p in parts]), split, parts[0].difficulty)
    if cache is not None:
        save_npz(cache, ps)
    return ps, np.repeat(np.arange(len(CONDITION_LABELS)), n_per_condition)
