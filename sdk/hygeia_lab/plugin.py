"""The lab's registration (entry point ``lab`` in group ``hygeia``): the ``phantom`` generator,
the ``png-grid`` output format and the ``evaluate`` and ``demo`` commands."""
from __future__ import annotations

from typing import Any, Iterator

from hygeia import hookimpl
from hygeia.api import OutputFormat, PluginSpec


@hookimpl
def hygeia_generators() -> Iterator[PluginSpec]:
    from .phantom_generator import SPEC

    yield SPEC


def _write_grid(results: Any, out: Any, **context: Any) -> list[Any]:
    from .grids import write_image_grid

    return [write_image_grid(out, results, **context)]


@hookimpl
def hygeia_output_formats() -> Iterator[OutputFormat]:
    yield OutputFormat(name="png-grid", accepts="images", suffixes=(".png",), write=_write_grid,
                       description="One PNG grid of generated images, with a SYNTHETIC banner and PNG metadata")


@hookimpl
def hygeia_cli_commands(app: Any) -> None:
    from .cli import register

    register(app)
