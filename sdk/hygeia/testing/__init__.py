"""The contract-test kit for plugin authors.

Installed as a pytest plugin (entry point ``pytest11``), so the fixtures below are available in
any test suite once hygeia is installed. Subclass a contract for your plugin::

    from hygeia.testing import GeneratorContract

    class TestMyGenerator(GeneratorContract):
        plugin_name = "my-gan"

or build the class in one line: ``TestMine = contract_for("generator", "my-gan")``.
"""
import pytest

pytest.register_assert_rewrite("hygeia.testing.contracts")

from .contracts import (  # noqa: E402
    CONTRACTS,
    ConditionerContract,
    DiagnoserContract,
    GeneratorContract,
)

__all__ = ["CONTRACTS", "ConditionerContract", "DiagnoserContract", "GeneratorContract", "contract_for"]


def contract_for(kind: str, name: str, **options: object) -> type:
    """A contract test class for plugin ``name`` of ``kind``, ready to be assigned to a ``Test*`` name."""
    base = CONTRACTS[kind]
    return type(f"Test_{kind}_{name}".replace("-", "_"), (base,), {"plugin_name": name, "plugin_options": options})
