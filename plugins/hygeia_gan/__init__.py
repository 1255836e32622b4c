"""Built-in generator ``gan``: a conditional GAN for 64x64 chest-radiograph phantoms."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
