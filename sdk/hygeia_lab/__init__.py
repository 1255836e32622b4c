"""The Hygeia lab: phantoms, evaluation and metrics, adversarial training helpers, image grids.

The lab sits beside the core (:mod:`hygeia`): it imports the core and is never imported by it.
Plugins' trainers, the benchmarks and the tests use it; the lab registers itself like any other
plugin package (entry point ``lab``: the ``phantom`` generator, the ``png-grid`` output format and
the ``hygeia evaluate`` / ``hygeia demo`` commands). See docs/architecture.md.
"""
from __future__ import annotations

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
from .studies import write_phantom_dicom, write_phantom_study

__all__ = [
    "DEFAULT_DIFFICULTY", "FOV_MM", "SPLITS", "Phantom", "PhantomSet", "class_conditional_set", "load_npz",
    "make_phantom", "make_phantom_set", "phantom_labels_text", "sample_findings", "save_npz", "split_seeds",
    "write_phantom_dicom", "write_phantom_study",
]
