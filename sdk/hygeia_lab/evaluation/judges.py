"""Which image-only diagnoser judges generated images or baselines a text-aware diagnoser.

A judge must read the images at their own size: the 64 px phantom model judges the 64 px
generators, while the default diagnoser reads 256 px. :func:`default_baseline` picks by the size
each diagnoser's spec declares, so the lab never names a plugin.
"""
from __future__ import annotations


def default_baseline(size: int | None = None, exclude: str = "") -> str:
    """The image-only diagnoser that judges or baselines images of ``size`` pixels (``--baseline``,
    ``--judge`` override it): the default diagnoser (``HYGEIA_DIAGNOSER`` or the spec marked
    ``default``) when it reads that size (or no size is given); else the installed diagnoser other
    than ``exclude`` whose spec reads the largest size not above it (downsampling, never
    upsampling, the images); else the default."""
    from hygeia.plugins import get_registry
    from hygeia.tensors import IMAGES

    reg = get_registry()
    default = reg.default_name("diagnoser")
    if size is None:
        return default
    sizes: dict[str, int] = {}
    for spec in reg.all("diagnoser"):
        img = next((t for t in spec.inputs if t.name == IMAGES), None)
        if img is not None and len(img.dims) == 3 and img.dims[1] == img.dims[2] and spec.name != exclude:
            sizes[spec.name] = int(img.dims[1])
    if sizes.get(default) == size:
        return default
    fits = sorted((-v, k) for k, v in sizes.items() if 0 < v <= size)
    return fits[0][1] if fits else default


TARGETS = {"gain_over_image_only": 0.05, "shuffled_text_within": 0.01, "localisation_each_finding": 0.85}
"""Targets of a text-aware diagnoser, printed next to the measured numbers (not enforced): the
macro AUROC gain over the best image-only row (with a bootstrap interval excluding 0), the
shuffled-text control's distance from that row, and the localisation hit rate within
``NEAR_PX`` px at 128 px scale of every finding."""
