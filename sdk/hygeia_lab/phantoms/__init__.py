"""Synthetic chest-radiograph phantoms (the generator is in :mod:`.render`)."""
from __future__ import annotations

from .render import (
    DEFAULT_DIFFICULTY,
    FOV_MM,
    SPLITS,
    Phantom,
    PhantomSet,
    class_conditional_set,
    load_npz,
    make_phantom,
    make_phantom_set,
    phantom_labels_text,
    sample_findings,
    save_npz,
    split_seeds,
)

__all__ = [
    "DEFAULT_DIFFICULTY", "FOV_MM", "SPLITS", "Phantom", "PhantomSet", "make_phantom",
    "make_phantom_set", "class_conditional_set", "split_seeds", "save_npz", "load_npz", "sample_findings",
    "phantom_labels_text",
]
