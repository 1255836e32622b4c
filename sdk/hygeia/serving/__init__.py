"""Triton serving for Hygeia plugins.

- :mod:`hygeia.serving.repository`: ``build_repository`` writes one Triton model per plugin.
- :mod:`hygeia.serving.adapter`: the Python-backend model every generated ``model.py`` delegates to.
- :mod:`hygeia.serving.server`: ``TritonServer``, the embedded tritonserver as a context manager.
- :mod:`hygeia.serving.remote`: ``RemoteGenerator`` / ``RemoteConditioner`` / ``RemoteDiagnoser``
  and :func:`connect`, the same protocols as local plugins over gRPC.
- :mod:`hygeia.serving.wire`: the tensor wire format, defined once.

Everything heavy (tritonclient, torch) is imported lazily.
"""
from __future__ import annotations

from typing import Any

__all__ = ["connect", "TritonServer", "build_repository", "RemoteGenerator", "RemoteConditioner",
           "RemoteDiagnoser"]


def connect(kind: str, name: str, server: str, **opts: Any) -> Any:
    """The ``kind``/``name`` plugin served by Triton at ``server`` (``HOST:PORT``): see :func:`hygeia.serving.remote.connect`."""
    from .remote import connect as _connect

    return _connect(kind, name, server, **opts)


def __getattr__(name: str) -> Any:
    if name == "TritonServer":
        from .server import TritonServer

        return TritonServer
    if name == "build_repository":
        from .repository import build_repository

        return build_repository
    if name in ("RemoteGenerator", "RemoteConditioner", "RemoteDiagnoser"):
        from . import remote

        return getattr(remote, name)
    raise AttributeError(name)
