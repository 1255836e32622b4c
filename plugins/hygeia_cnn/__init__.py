"""Built-in diagnoser ``cnn``: an image-only multi-label classifier (MONAI ResNet) with Grad-CAM."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
