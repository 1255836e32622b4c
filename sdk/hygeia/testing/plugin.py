"""pytest plugin (entry point ``pytest11``), active wherever hygeia is installed.

Fixtures:

- ``hygeia_registry``: the process-wide plugin registry (``hygeia.get_registry()``).

The lab adds ``hygeia_phantoms`` (:mod:`hygeia_lab.pytest_plugin`).

The contract classes themselves live in :mod:`hygeia.testing`.
"""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def hygeia_registry() -> Any:
    """The process-wide plugin registry."""
    from hygeia.plugins import get_registry

    return get_registry()

