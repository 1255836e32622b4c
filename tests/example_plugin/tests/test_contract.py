"""The third-party path end to end: this package is installed separately, found by entry point,
and checked with the kit that ships with hygeia."""
from hygeia.testing import DiagnoserContract


class TestExampleIntensity(DiagnoserContract):
    plugin_name = "example-intensity"


def test_listed_with_its_own_package(hygeia_registry):
    spec = hygeia_registry.get("diagnoser", "example-intensity")
    assert spec.package == "hygeia-example-plugin"
