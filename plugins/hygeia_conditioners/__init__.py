"""Built-in conditioners: ``label`` (finding vocabulary -> embedding)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_conditioners():  # type: ignore[no-untyped-def]
    from . import label

    yield label.SPEC
    from . import property

    yield property.SPEC
    from . import text

    yield text.SPEC
