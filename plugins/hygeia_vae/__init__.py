"""Built-in VAE generators: ``molecule-vae`` (SMILES, conditional on molecular properties)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import molecule

    yield molecule.SPEC
    from . import image

    yield image.SPEC
