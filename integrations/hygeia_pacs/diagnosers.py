"""The diagnoser the gateway runs: a plugin in process, or one served by Triton (``server``), with
an optional in-process fallback (``local_fallback``) while that server cannot be reached.

With the fallback, a batch whose remote call fails with
:class:`hygeia.serving.connection.ServerUnavailableError` (after the connection's own retries) is
diagnosed in process by the same plugin (``diagnoser_bundle`` if set). Batches in the next
``fallback_probe_s`` seconds run in process straight away (they do not wait out the connection's
retries again); the first one after that tries the server again. One log line marks each switch,
and the gateway counts the images diagnosed on the fallback
(``Gateway.counters["diagnosed_locally"]``). Without the fallback the study's attempt fails and is
retried with back-off.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from hygeia.api import regions_options

from .config import GatewayConfig

log = logging.getLogger("hygeia_pacs.gateway")


diagnose_options = regions_options
"""What the gateway passes to ``diagnose()``: the SR needs the regions, not the heat maps
(:func:`hygeia.api.regions_options`)."""


def _unavailable(exc: BaseException) -> bool:
    from hygeia.serving.connection import ServerUnavailableError

    return isinstance(exc, ServerUnavailableError)


class Diagnosers:
    """The configured diagnoser (``given``, or built on first use) and the local fallback of a
    remote one. Calls never overlap (the gateway holds its diagnose lock)."""

    def __init__(self, config: GatewayConfig, given: Any | None = None) -> None:
        self.config = config
        self._primary = given
        self._local: Any = None
        self.on_local = False  # the last batch ran on the fallback
        self._probe_at = 0.0  # on the fallback: when to try the server again

    def _resting(self) -> bool:
        """On the fallback, and the server was tried less than ``fallback_probe_s`` ago."""
        return self.on_local and time.monotonic() < self._probe_at

    def _name(self) -> str:
        from hygeia.plugins import get_registry

        return self.config.diagnoser or get_registry().default_name("diagnoser")

    def local(self) -> Any:
        """The plugin in process (its bundle if ``diagnoser_bundle`` is set), built on first use."""
        if self._local is None:
            from hygeia.plugins import get_registry

            reg, name = get_registry(), self._name()
            bundle = self.config.diagnoser_bundle  # e.g. a model trained on the site's own studies
            self._local = reg.create_from_bundle("diagnoser", name, bundle) if bundle else reg.create("diagnoser", name)
        return self._local

    def primary(self) -> Any:
        """The configured diagnoser: Triton's over gRPC when ``server`` is set, else :meth:`local`."""
        if self._primary is None:
            if self.config.server:
                from hygeia.serving import connect

                self._primary = connect("diagnoser", self._name(), self.config.server)
            else:
                self._primary = self.local()
        return self._primary

    def _fall_back(self, exc: BaseException) -> Any:
        if not (self.config.local_fallback and self.config.server and _unavailable(exc)):
            raise exc
        if not self.on_local:
            log.warning("diagnoser server unavailable (%s); diagnosing in process until it answers again "
                        "(trying it every %g s)", str(exc).splitlines()[0][:200], self.config.fallback_probe_s)
            self.on_local = True
        self._probe_at = time.monotonic() + float(self.config.fallback_probe_s)
        return self.local()

    def current(self) -> Any:
        """The primary, or the local fallback while a remote primary cannot be built (or was
        unavailable less than ``fallback_probe_s`` ago)."""
        if self._resting():
            return self.local()
        try:
            return self.primary()
        except Exception as exc:
            return self._fall_back(exc)

    def diagnose(self, images: np.ndarray, texts: Sequence[str] | None, batch_size: int) -> tuple[list[Any], bool]:
        """Diagnoses of ``images``, ``batch_size`` at a time, and whether they ran on the fallback."""
        if self._resting():
            return _run(self.local(), images, texts, batch_size), True
        diag = self.current()
        try:
            out = _run(diag, images, texts, batch_size)
        except Exception as exc:
            if diag is not self._primary or diag is self._local:
                raise
            diag = self._fall_back(exc)
            return _run(diag, images, texts, batch_size), True
        if diag is self._local and self.config.server:
            return out, True
        if self.on_local:
            log.warning("diagnoser server answers again; diagnosing on it")
            self.on_local = False
        return out, False


def _run(diag: Any, images: np.ndarray, texts: Sequence[str] | None, bs: int) -> list[Any]:
    kw, out = diagnose_options(diag), []
    for i in range(0, len(images), bs):
        out.extend(diag.diagnose(images[i:i + bs], texts=None if texts is None else texts[i:i + bs], **kw))
    return out
