"""Hygeia: a plugin-based clinical imaging SDK.

The core defines three plugin kinds (generator, conditioner, diagnoser) through pluggy
(:mod:`hygeia.hookspecs`), finds plugins by entry point (:mod:`hygeia.plugins`), and shares
result types (:mod:`hygeia.api`) with serving and DICOM integrations.
"""
from __future__ import annotations

from .api import (
    Conditioner,
    Diagnoser,
    Diagnosis,
    Finding,
    GeneratedImage,
    GeneratedMolecule,
    Generator,
    ModelCard,
    ModelIdentity,
    PluginSpec,
    Region,
    TensorSpec,
)
from .errors import (
    BundleError,
    HygeiaError,
    InputError,
    PluginConflictError,
    PluginNotFoundError,
    UnsupportedConditionError,
)
from .plugins import create, get_registry, hookimpl

__version__ = "0.1.0"

__all__ = [
    "BundleError", "Conditioner", "Diagnoser", "Diagnosis", "Finding", "GeneratedImage",
    "GeneratedMolecule", "Generator", "HygeiaError", "InputError", "ModelCard", "ModelIdentity",
    "PluginConflictError", "PluginNotFoundError", "PluginSpec", "Region", "TensorSpec",
    "UnsupportedConditionError", "__version__", "create", "get_registry", "hookimpl",
]
