"""Every plugin that ships with hygeia passes the contract kit (third-party packages are checked
in their own test suites: see tests/example_plugin/tests)."""
from __future__ import annotations

from hygeia.plugins import get_registry
from hygeia.testing import contract_for

BUILTIN_PACKAGE = "hygeia"
_specs = [s for s in get_registry().all() if s.package == BUILTIN_PACKAGE]

for _spec in _specs:
    _cls = contract_for(_spec.kind, _spec.name)
    globals()[_cls.__name__] = _cls


def test_builtins_present():
    names = {(s.kind, s.name) for s in _specs}
    assert {("conditioner", "label"), ("generator", "phantom"), ("diagnoser", "cnn")} <= names
    assert not [f for f in get_registry().failures if f.package == BUILTIN_PACKAGE], get_registry().failures
