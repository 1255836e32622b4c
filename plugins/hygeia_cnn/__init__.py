"""Built-in diagnosers ``cxr`` (256 px, the default) and ``cnn`` (64 px phantoms, the generators'
judge): image-only multi-label classifiers (MONAI ResNet) with Grad-CAM."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.CXR_SPEC
    yield plugin.SPEC
