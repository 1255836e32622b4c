"""The plugin manager: loads the entry-point group ``hygeia`` and keeps a registry by name.

Built-in plugins are found the same way as third-party ones (entry points in pyproject.toml).
Environment variables filter plugins by name (spec name or entry-point name, comma-separated):

- ``HYGEIA_PLUGINS``: if set, only these are registered (an allow list);
- ``HYGEIA_DISABLE_PLUGINS``: these are never registered (a block list, applied last).

A plugin that fails to import is recorded in :attr:`PluginRegistry.failures` with its name and
error, and logged; the others still load.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .api import KINDS, Kind, OutputFormat, PluginSpec
from .errors import InputError, PluginConflictError, PluginNotFoundError

log = logging.getLogger(__name__)
hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
ENTRY_POINT_GROUP = "hygeia"
_HOOK_OF_KIND = {"generator": "hygeia_generators", "conditioner": "hygeia_conditioners",
                 "diagnoser": "hygeia_diagnosers"}


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    package: str
    error: str


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginRegistry:
    """All plugin specs by kind and name. Use :func:`get_registry` for the process-wide one."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[LoadFailure] = []
        self._package: dict[int, str] = {}  # id(plugin object) -> distribution name
        self._ep_name: dict[int, str] = {}
        self._specs: dict[tuple[str, str], PluginSpec] | None = None
        self._lock = threading.Lock()
        if load_entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        blocked = _names("HYGEIA_DISABLE_PLUGINS") or set()
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            if ep.name in blocked:
                log.info("plugin entry point %r blocked by HYGEIA_DISABLE_PLUGINS", ep.name)
                continue
            package = ep.dist.name if ep.dist is not None else "?"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(LoadFailure(ep.name, package, f"{type(exc).__name__}: {exc}"))
                log.warning("hygeia plugin %r (%s) failed to load: %s: %s", ep.name, package,
                            type(exc).__name__, exc)
                continue
            self.register(obj, name=ep.name, package=package)

    def register(self, plugin: Any, name: str | None = None, package: str = "") -> None:
        """Register a plugin object (a module or instance with ``@hookimpl`` functions)."""
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=name)
        self._package[id(plugin)] = package or getattr(plugin, "__name__", type(plugin).__name__)
        self._ep_name[id(plugin)] = name or ""
        self._specs = None

    def unregister(self, plugin: Any) -> None:
        self.pm.unregister(plugin)
        self._specs = None

    # -- the registry ----------------------------------------------------------
    def _collect(self) -> dict[tuple[str, str], PluginSpec]:
        allowed, blocked = _names("HYGEIA_PLUGINS"), _names("HYGEIA_DISABLE_PLUGINS") or set()
        specs: dict[tuple[str, str], PluginSpec] = {}
        for kind in KINDS:
            hook = getattr(self.pm.hook, _HOOK_OF_KIND[kind])
            for impl in hook.get_hookimpls():
                package = self._package.get(id(impl.plugin), impl.plugin_name)
                ep_name = self._ep_name.get(id(impl.plugin), "")
                for spec in _as_list(impl.function()):
                    if not isinstance(spec, PluginSpec) or spec.kind != kind:
                        raise TypeError(f"{_HOOK_OF_KIND[kind]} in {package}: expected PluginSpec(kind="
                                        f"{kind!r}) items, got {spec!r}"[:300])
                    if spec.name in blocked or (allowed is not None and spec.name not in allowed
                                                and ep_name not in allowed):
                        continue
                    spec = _with_package(spec, package)
                    key = (kind, spec.name)
                    if key in specs:
                        raise PluginConflictError(kind, spec.name, specs[key].package, package)
                    specs[key] = spec
        return specs

    @property
    def specs(self) -> dict[tuple[str, str], PluginSpec]:
        with self._lock:
            if self._specs is None:
                self._specs = self._collect()
            return self._specs

    def all(self, kind: Kind | None = None) -> list[PluginSpec]:
        return [s for (k, _), s in sorted(self.specs.items()) if kind is None or k == kind]

    def names(self, kind: Kind) -> list[str]:
        return [s.name for s in self.all(kind)]

    def get(self, kind: Kind, name: str) -> PluginSpec:
        try:
            return self.specs[(kind, name)]
        except KeyError:
            raise PluginNotFoundError(kind, name, self.names(kind)) from None

    def find(self, name: str) -> PluginSpec:
        """Look a name up in every kind (names are unique per kind; generators first)."""
        for kind in ("generator", "diagnoser", "conditioner"):
            if (kind, name) in self.specs:
                return self.specs[(kind, name)]
        raise PluginNotFoundError("generator/diagnoser/conditioner", name,
                                  sorted({s.name for s in self.specs.values()}))

    def output_formats(self) -> dict[str, OutputFormat]:
        """Every registered output format by name (a duplicate name is an error naming both)."""
        formats: dict[str, OutputFormat] = {}
        for impl in self.pm.hook.hygeia_output_formats.get_hookimpls():
            package = self._package.get(id(impl.plugin), impl.plugin_name)
            for fmt in _as_list(impl.function()):
                if fmt.name in formats:
                    raise PluginConflictError("output format", fmt.name, formats[fmt.name].package, package)
                formats[fmt.name] = fmt if fmt.package else replace(fmt, package=package)
        return formats

    def output_format(self, name: str) -> OutputFormat:
        formats = self.output_formats()
        if name not in formats:
            raise PluginNotFoundError("output format", name, list(formats))
        return formats[name]

    def output_format_for(self, path: Any, accepts: str) -> OutputFormat:
        """The output format that writes ``accepts`` results to a file with ``path``'s suffix."""
        suffix = os.path.splitext(str(path))[1].lower()
        found = [f for f in self.output_formats().values() if f.accepts == accepts and suffix in f.suffixes]
        if len(found) != 1:
            known = sorted({x for f in self.output_formats().values() if f.accepts == accepts for x in f.suffixes})
            raise InputError("out", f"a file ending in one of {', '.join(known) or 'none'}", got=str(path))
        return found[0]

    def default_name(self, kind: Kind) -> str:
        """The plugin of ``kind`` to use when the user names none.

        In order: the environment variable ``HYGEIA_<KIND>`` (``HYGEIA_DIAGNOSER=cnn``); the one
        installed plugin whose spec says ``default=True``; the only installed plugin of that kind.
        Anything else is an error that says how to choose.
        """
        env = f"HYGEIA_{kind.upper()}"
        chosen = os.environ.get(env, "").strip()
        if chosen:
            self.get(kind, chosen)
            return chosen
        flagged = [s.name for s in self.all(kind) if s.default]
        if len(flagged) == 1:
            return flagged[0]
        names = self.names(kind)
        if not flagged and len(names) == 1:
            return names[0]
        among = ", ".join(flagged or names) or "none installed"
        raise InputError(f"{kind} plugin", f"a name (set {env} or pass the plugin name; installed: {among})",
                         got="no name and no single default")

    def create(self, kind: Kind, name: str, **options: Any) -> Any:
        """Build the plugin object: ``get(kind, name).factory(**options)``."""
        return self.get(kind, name).factory(**options)

    def create_from_bundle(self, kind: Kind, name: str, bundle: str | os.PathLike[str] | None,
                           **options: Any) -> Any:
        """Build the plugin from the bundle folder ``bundle`` instead of its shipped weights (e.g. one
        ``hygeia train --data`` wrote): its factory's ``bundle`` argument. One-line errors. None:
        the shipped weights (:meth:`create`)."""
        import inspect

        if bundle is None:
            return self.create(kind, name, **options)
        spec = self.get(kind, name)
        if "bundle" not in inspect.signature(spec.factory).parameters:
            raise InputError("--bundle", f"a plugin whose factory takes a bundle ({kind} {name!r} does not)")
        if not Path(bundle).is_dir():
            raise InputError(f"--bundle {str(bundle)!r}", "a bundle folder (config.json, model.safetensors)",
                             got="no such folder")
        return spec.factory(bundle=bundle, **options)


def _as_list(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, (PluginSpec, OutputFormat)):
        return [result]
    return list(result)


def _with_package(spec: PluginSpec, package: str) -> PluginSpec:
    return spec if spec.package else replace(spec, package=package)


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry (tests; after changing the env filters)."""
    global _registry
    with _registry_lock:
        _registry = None


def create(kind: Kind, name: str, **options: Any) -> Any:
    """Shortcut: ``get_registry().create(kind, name, **options)``."""
    return get_registry().create(kind, name, **options)
