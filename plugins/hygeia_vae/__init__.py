"""Built-in generator ``vae``: an image VAE with a label-conditional latent prior (64x64 phantoms)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
