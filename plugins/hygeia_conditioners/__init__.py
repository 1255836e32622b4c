"""Built-in conditioners: ``label`` (finding label -> 32-d embedding), ``text`` (free text ->
all-MiniLM-L6-v2 vectors) and ``property`` (molecular property targets -> 8-d vector)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_conditioners():  # type: ignore[no-untyped-def]
    from . import plugin

    yield from plugin.SPECS
