"""Data: synthetic chest-radiograph phantoms, a phantom DICOM writer, and image readers.

Imports stay light (numpy, scipy): no torch at import time. Names from :mod:`hygeia.data.io`
(DICOM/NIfTI/PNG readers, ``prepare_image``) and :mod:`hygeia.data.dicom` load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .phantoms import (
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

_LAZY = {
    "write_phantom_dicom": "dicom",
    "write_phantom_study": "dicom",
    "phantom_dataset": "dicom",
}

__all__ = [
    "DEFAULT_DIFFICULTY", "FOV_MM", "SPLITS", "Phantom", "PhantomSet", "class_conditional_set", "load_npz", "make_phantom",
    "make_phantom_set", "phantom_labels_text", "sample_findings", "save_npz", "split_seeds", *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Lazy access to the DICOM writer and to the readers in :mod:`hygeia.data.io`."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_"):
        io = importlib.import_module(".io", __name__)
        if hasattr(io, name):
            return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
