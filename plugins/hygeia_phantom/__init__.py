"""Built-in generator ``phantom``: procedural chest-radiograph phantoms (no weights)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import generator

    yield generator.SPEC
