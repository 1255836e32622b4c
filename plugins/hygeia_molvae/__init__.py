"""Built-in generator ``molecule-vae``: a conditional SMILES VAE (logP, QED, SA, MW targets) trained on MOSES."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
