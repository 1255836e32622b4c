"""Data I/O: readers for DICOM (every transfer syntax pydicom can decode), NIfTI, PNG/JPEG and
numpy images, and ``prepare_image`` (resize and scale to what a diagnoser reads).

Imports stay light: the readers in :mod:`hygeia.data.io` load on first use. Synthetic phantoms
are the lab's (:mod:`hygeia_lab.phantoms`), not the core's.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy access to the readers in :mod:`hygeia.data.io`."""
    if not name.startswith("_"):
        io = importlib.import_module(".io", __name__)
        if hasattr(io, name):
            return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
