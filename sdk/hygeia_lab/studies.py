"""Phantom studies on disk: phantoms written as DICOM Digital X-Ray images, marked synthetic.

The pixels and ground truth come from :func:`hygeia_lab.phantoms.make_phantom`; the DICOM
objects are written by the ``dicom-dx`` output format (the DICOM integration), looked up in
the plugin registry like every other output format. The same seed writes the same files and UIDs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from hygeia.api import ModelIdentity
from hygeia.errors import InputError
from hygeia.plugins import get_registry
from hygeia.vocab import NORMAL, finding

from .phantom_generator import NAME, VERSION, as_generated_image
from .phantoms import DEFAULT_DIFFICULTY, make_phantom

__all__ = ["write_phantom_dicom", "write_phantom_study"]

_IDENTITY = ModelIdentity(NAME, VERSION, "generator", None)


def _findings_arg(finding_label: str | None) -> list[str] | None:
    if finding_label is None:
        return None
    ft = finding(finding_label)
    return [] if ft is NORMAL else [ft.label]


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= int(size) <= 2048:
        raise InputError("size", "an integer number of pixels in [16, 2048]", got=repr(size))
    return int(size)


def write_phantom_dicom(path: str | os.PathLike[str], seed: int = 0, finding: str | None = None,
                        size: int = 128, difficulty: float = DEFAULT_DIFFICULTY) -> Path:
    """Write one phantom (``finding``: a label, ``"normal"``, or None for sampled findings) as DX DICOM."""
    p = make_phantom(seed, size=_check_size(size), findings=_findings_arg(finding), difficulty=difficulty)
    path = Path(path)
    writer = get_registry().output_format("dicom-dx")
    return writer.write([as_generated_image(p, _IDENTITY)], path.parent, filenames=[path.name])[0]


def write_phantom_study(outdir: str | os.PathLike[str], n: int = 4, seed: int = 0, size: int = 128,
                        findings: Sequence[str | None] | None = None,
                        difficulty: float = DEFAULT_DIFFICULTY) -> list[Path]:
    """Write one study of ``n`` phantom instances (one series) into ``outdir``; returns the paths.

    Instance ``i`` is the phantom of seed ``SeedSequence([0x44434D, seed, i])``; ``findings``
    optionally forces the finding of each instance (a label, "normal" or None).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 1000:
        raise InputError("n", "an integer in [1, 1000]", got=repr(n))
    if findings is not None and len(findings) != n:
        raise InputError("findings", f"one label (or None) per instance ({n})", got=len(findings))
    size = _check_size(size)
    images, names = [], []
    for i in range(int(n)):
        s = int(np.random.SeedSequence([0x44434D, int(seed), i]).generate_state(1, np.uint64)[0])
        f = None if findings is None else findings[i]
        p = make_phantom(s, size=size, findings=_findings_arg(f), difficulty=difficulty)
        images.append(as_generated_image(p, _IDENTITY))
        names.append(f"phantom_{seed}_{i + 1:03d}.dcm")
    writer = get_registry().output_format("dicom-dx")
    return writer.write(images, Path(outdir), study_seed=int(seed), filenames=names)
