"""Images to a Triton server on the same host through system shared memory instead of gRPC.

A client next to its server (the gateway beside Triton, a notebook on the GPU host) need not
copy every image into a protobuf message and back out of it: Triton reads inputs from POSIX
shared-memory regions the client registered (Triton's *system shared memory* extension). Each
client (one per thread and endpoint, see :class:`~hygeia.serving.connection.Connection`) keeps one
region: written before each request, grown when an input is larger, registered once. Small inputs,
strings and text stay on the wire.

``shared_memory="auto"`` (the default of :func:`hygeia.serving.connect`) uses it when the server
address is a loopback one (``127.0.0.1``, ``localhost``, ``::1``) without TLS; if the server cannot
map the region (a container with its own ``/dev/shm``), the first request says so in one log line
and every request goes on the wire from then on. ``True`` asks for it on any address (a server on
the same host under another name), ``False`` turns it off.
"""
from __future__ import annotations

import logging
import os
import uuid
import weakref
from typing import Any

import numpy as np

log = logging.getLogger("hygeia.serving")

MIN_BYTES = 64 * 1024
"""Inputs smaller than this go on the wire (a region saves nothing on a few kilobytes)."""

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

_LOST = ("shared memory region", "shared_memory_region", "Unable to find system shared memory")


def wanted(setting: bool | str, host: str, tls: bool) -> bool:
    """Whether a connection to ``host`` uses shared memory under ``setting`` (True, False, "auto")."""
    if setting not in (True, False, "auto"):
        from ..errors import InputError

        raise InputError("shared_memory", "True, False or 'auto'", got=repr(setting))
    if setting == "auto":
        return not tls and host in LOOPBACK
    return bool(setting)


def is_lost_region(exc: BaseException) -> bool:
    """Whether a failed request failed because the server no longer knows the region (restarted)."""
    return any(s in str(exc) for s in _LOST)


def _release(handle: Any, client: Any = None, name: str = "", headers: dict[str, str] | None = None) -> None:
    """Unregister ``name`` with the server (with ``client``; best effort) and free the region."""
    from tritonclient.utils import shared_memory as shm

    if client is not None:
        try:
            client.unregister_system_shared_memory(name, headers=headers, client_timeout=2)
        except Exception:  # noqa: BLE001 - the server may be gone; the region is freed below anyway
            pass
    try:
        shm.destroy_shared_memory_region(handle)
    except Exception:  # noqa: BLE001 - already gone: nothing left to free
        pass


class SharedInput:
    """One client's shared-memory region for its largest input of each request.

    ``place(name, array)`` returns a tritonclient ``InferInput`` that points at the region (the
    array copied into it), or None when the input should go on the wire. Not thread-safe: one per
    client, and clients are per thread.
    """

    def __init__(self, client: Any, headers: dict[str, str], timeout: float, server: str) -> None:
        self.client, self.headers, self.timeout, self.server = client, headers, timeout, server
        self.enabled = True
        self.handle: Any = None
        self.size = 0
        self.registered = False
        self.name = f"hygeia-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._finalizer: Any = None

    def place(self, name: str, array: np.ndarray) -> Any | None:
        if not self.enabled or array.dtype == np.object_ or array.nbytes < MIN_BYTES:
            return None
        from tritonclient.grpc import InferInput
        from tritonclient.utils import np_to_triton_dtype
        from tritonclient.utils import shared_memory as shm

        a = np.ascontiguousarray(array)
        if not self._ready(a.nbytes):
            return None
        shm.set_shared_memory_region(self.handle, [a])
        t = InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
        t.set_shared_memory(self.name, a.nbytes)
        return t

    def _ready(self, nbytes: int) -> bool:
        """A region of at least ``nbytes``, registered with the server; False (and off) if it cannot be."""
        from tritonclient.utils import shared_memory as shm

        try:
            if nbytes > self.size:
                size = max(nbytes, 2 * self.size)  # room to grow: a larger batch does not re-register each time
                self.close()
                self.handle = shm.create_shared_memory_region(self.name, f"/{self.name}", size)
                self.size = size
                self._finalizer = weakref.finalize(self, _release, self.handle)
            if not self.registered:
                self.client.register_system_shared_memory(self.name, f"/{self.name}", self.size, headers=self.headers,
                                                          client_timeout=self.timeout)
                self.registered = True
                self._finalizer.detach()  # from now on also unregister it, at exit or when dropped
                self._finalizer = weakref.finalize(self, _release, self.handle, self.client, self.name, self.headers)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure: images go on the wire instead
            first = " ".join(str(exc).split())[:160]
            log.info("shared memory with %s is off, images go over gRPC: %s", self.server, first)
            self.close()
            self.enabled = False
            return False

    def forget(self) -> None:
        """The server lost the registration (it restarted): register again on the next request."""
        self.registered = False

    def close(self) -> None:
        """Unregister the region and free it."""
        self.registered = False
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.handle, self.size = None, 0
