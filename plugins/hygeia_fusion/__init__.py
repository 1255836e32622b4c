"""Built-in diagnoser ``fusion``: MONAI ResNet vision encoder + frozen all-MiniLM-L6-v2 language
encoder + co-attention fusion + multi-label finding head, with per-finding heat maps and regions.

Registered through the ``hygeia`` entry point ``fusion = "hygeia_fusion"``, like any third-party
plugin. MONAI and the text encoder are imported only when the plugin is created.
"""
from __future__ import annotations

from hygeia import hookimpl


@hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    from . import plugin

    yield plugin.SPEC
