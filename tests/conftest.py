"""Shared test setup: keep torch on one thread per process (CI has 2 cores), fresh registry."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget the process-wide registry before and after a test that changes env filters."""
    from hygeia.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()
