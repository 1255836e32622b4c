"""The Hygeia plugin contract: every hook a plugin may implement.

A plugin is a module or object with functions decorated ``@hygeia.hookimpl``, registered under
the entry-point group ``hygeia`` in its package metadata::

    [project.entry-points.hygeia]
    my-models = "my_models.plugin"

Each registration hook returns (or yields) :class:`hygeia.api.PluginSpec` objects. A spec name
must be unique within its kind across every installed plugin: a second spec with the same kind
and name is an error that names both packages.
"""
from __future__ import annotations

from typing import Iterable

import pluggy

from .api import OutputFormat, PluginSpec

PROJECT = "hygeia"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def hygeia_generators() -> Iterable[PluginSpec]:
    """Register generators: plugins that synthesise images or molecules.

    Return or yield ``PluginSpec(kind="generator", ...)``. The factory returns an object that
    satisfies :class:`hygeia.api.Generator`: ``generate(n, condition=None, seed=0, **options)``
    returning ``GeneratedImage`` or ``GeneratedMolecule`` objects, the same output for the
    same seed, condition and weights.

    Example::

        @hygeia.hookimpl
        def hygeia_generators():
            yield PluginSpec(kind="generator", name="my-gan", version="1.0", ...)
    """


@hookspec
def hygeia_conditioners() -> Iterable[PluginSpec]:
    """Register conditioners: plugins that turn conditions into tensors ``[B, D]``.

    Return or yield ``PluginSpec(kind="conditioner", ...)``; the factory returns a
    :class:`hygeia.api.Conditioner`. Conditions are finding labels (``"effusion"``), free text
    (a prompt, a clinical history) or property targets (``{"logP": 2.5}``); ``condition_kinds``
    says which the conditioner accepts, and any other raises ``UnsupportedConditionError``.
    """


@hookspec
def hygeia_diagnosers() -> Iterable[PluginSpec]:
    """Register diagnosers: plugins that find findings in images, optionally using text.

    Return or yield ``PluginSpec(kind="diagnoser", ...)``; the factory returns a
    :class:`hygeia.api.Diagnoser` whose ``diagnose(images, texts=None)`` returns one
    ``Diagnosis`` per image, with findings coded from :mod:`hygeia.vocab`.
    """


@hookspec
def hygeia_output_formats() -> Iterable[OutputFormat]:
    """Register writers for results, such as DICOM Structured Reports or Secondary Captures.

    Return or yield :class:`hygeia.api.OutputFormat`. The CLI finds writers by name: ``hygeia
    diagnose IN --sr OUT`` uses the format named ``sr``; ``hygeia generate ... --dicom DIR``
    uses ``dicom-sc``. Integrations provide them, so the core never imports an integration.
    """


@hookspec
def hygeia_cli_commands(app: "typer.Typer") -> None:  # type: ignore[name-defined]  # noqa: F821
    """Add commands to the ``hygeia`` command line (a :class:`typer.Typer` app).

    Called once when the CLI starts. Example::

        @hygeia.hookimpl
        def hygeia_cli_commands(app):
            @app.command()
            def gateway(config: Path): ...
    """
