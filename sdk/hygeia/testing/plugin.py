"""pytest plugin (entry point ``pytest11``), active wherever hygeia is installed.

Fixtures:

- ``hygeia_registry``: the process-wide plugin registry (``hygeia.get_registry()``);
- ``hygeia_phantoms``: a small held-out phantom set (images, labels, texts) for quick checks.

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


@pytest.fixture(scope="session")
def hygeia_phantoms() -> Any:
    """64 held-out 64x64 phantoms (``hygeia.data.PhantomSet``, split ``test``), made once per session."""
    from hygeia.data import make_phantom_set

    return make_phantom_set(64, split="test", size=64)
