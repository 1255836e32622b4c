"""pytest fixtures of the lab (entry point ``hygeia_lab`` in group ``pytest11``).

- ``hygeia_phantoms``: a small held-out phantom set (images, labels, texts) for quick checks.
"""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def hygeia_phantoms() -> Any:
    """64 held-out 64x64 phantoms (``hygeia_lab.phantoms.PhantomSet``, split ``test``), made once per test run."""
    from hygeia_lab.phantoms import make_phantom_set

    return make_phantom_set(64, split="test", size=64)
