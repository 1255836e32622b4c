"""Built-in generator ``diffusion``: class-conditional diffusion (diffusers UNet, DDPM training, DDIM/DPM-Solver sampling)."""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_generators():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
