"""Exceptions raised by Hygeia. Every message names the offending input and what was expected."""
from __future__ import annotations


class HygeiaError(Exception):
    """Base class for all Hygeia errors."""


class InputError(HygeiaError, ValueError):
    """Bad input: ``InputError("images", "a float32 array [B, 1, 64, 64]", got="uint8 [2, 64, 64]")``."""

    def __init__(self, name: str, expected: str, got: object | None = None) -> None:
        self.name = name
        self.expected = expected
        self.got = got
        msg = f"invalid {name}: expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


class UnsupportedConditionError(InputError):
    """The plugin does not accept this kind of condition."""


class PluginNotFoundError(HygeiaError, LookupError):
    """No plugin of that kind and name is registered."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        self.kind, self.name, self.available = kind, name, available
        avail = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown {kind} plugin {name!r}: expected one of {avail}")


class PluginConflictError(HygeiaError):
    """Two plugins registered the same kind and name."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(
            f"{kind} plugin name {name!r} is registered twice: by {first} and by {second}"
        )


class BundleError(HygeiaError):
    """A model bundle is missing, incomplete or corrupt."""
