"""One Triton gRPC endpoint with its options, and Triton's errors mapped to Hygeia's."""
from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import errors
from ..errors import HygeiaError, InputError, PluginNotFoundError
from . import shm

class RemoteError(HygeiaError):
    """The server failed a request for a reason other than bad input."""


class ServerUnavailableError(RemoteError, ConnectionError):
    """The server could not be reached (after the retries)."""


class RemoteTimeoutError(RemoteError, TimeoutError):
    """A request ran past its deadline."""


_CLASS_RE = re.compile(r"^(\w+Error): ")
_INPUT_RE = re.compile(r"invalid (.+?): expected (.*?)(?:, got (.*))?$", re.S)
_TRITON_INPUT_RE = re.compile(r"input '([^']+)'")
_RETRYABLE = ("StatusCode.UNAVAILABLE",)
_STUB_RESTART = "Stub process"  # the Python backend restarts a dead stub and fails the request that saw it


def map_error(exc: Exception, model: str) -> Exception:
    """Turn a tritonclient exception into the matching Hygeia error (server message kept)."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    msg = str(getattr(exc, "message", lambda: str(exc))() or exc)
    cls: type[InputError] | None = None
    c = _CLASS_RE.match(msg)
    if c:  # the adapter sends "<ErrorClass>: <message>" (stream errors carry no status code)
        found = getattr(errors, c.group(1), None)
        if isinstance(found, type) and issubclass(found, InputError):
            cls, msg = found, msg[c.end():]
    if status == "StatusCode.INVALID_ARGUMENT" or cls is not None:
        cls = cls or InputError
        m = _INPUT_RE.search(msg)
        if m:
            err = cls(m.group(1), m.group(2), got=m.group(3))
        else:
            t = _TRITON_INPUT_RE.search(msg)
            err = InputError(t.group(1) if t else f"request to {model}", msg)
        err.args = (msg,)
        return err
    if status == "StatusCode.NOT_FOUND" or "unknown model" in msg or "is not found" in msg:
        kind, _, name = model.partition("_")
        return PluginNotFoundError(f"remote {kind}", name or model, [])
    if status == "StatusCode.UNAVAILABLE":
        return ServerUnavailableError(f"Triton server unavailable for {model}: {msg}")
    if status == "StatusCode.DEADLINE_EXCEEDED" or "Deadline Exceeded" in msg:
        return RemoteTimeoutError(f"request to {model} timed out: {msg}")
    return RemoteError(f"{model}: {msg}")


def split_server(server: str, name: str = "server") -> tuple[str, bool]:
    """``HOST:PORT`` of a Triton gRPC endpoint given as ``HOST:PORT`` or ``grpc[s]://HOST:PORT``
    (``http[s]://`` too), and whether its scheme asks for TLS; :class:`InputError` naming ``name``
    when there is no host or no numeric port."""
    url, tls = server, False
    for prefix, secure in (("grpcs://", True), ("grpc://", False), ("https://", True), ("http://", False)):
        if server.startswith(prefix):
            url, tls = server[len(prefix):].rstrip("/"), secure
            break
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(name, "HOST:PORT of Triton's gRPC endpoint", got=repr(server))
    return url, tls


class Connection:
    """A gRPC endpoint with options, one client per thread (tritonclient clients are not thread-safe).

    Args:
        server: ``HOST:PORT`` (``grpcs://HOST:PORT`` turns TLS on).
        timeout: deadline of one request, seconds.
        retries: retries on ``UNAVAILABLE`` (and on a restarting stub), with back-off
            ``backoff * 2**attempt`` seconds.
        ssl, root_certificates, private_key, certificate_chain: TLS (PEM file paths).
        headers: extra gRPC metadata on every call, e.g. ``{"authorization": "Bearer ..."}``;
        token: shortcut for a bearer token.
        shared_memory: send large inputs (images) through system shared memory: ``"auto"`` (a
            loopback address without TLS), True or False (:mod:`hygeia.serving.shm`).
    """

    def __init__(self, server: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2,
                 ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: Mapping[str, str] | None = None,
                 token: str | None = None, shared_memory: bool | str = "auto") -> None:
        self.url, tls = split_server(server)
        self.server = server
        self.ssl = ssl or tls or bool(root_certificates)
        self.root_certificates, self.private_key, self.certificate_chain = root_certificates, private_key, certificate_chain
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.headers: dict[str, str] = dict(headers or {})
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self._local = threading.local()
        self.shared_memory = shm.wanted(shared_memory, self.url.rsplit(":", 1)[0], self.ssl)

    def client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            import tritonclient.grpc as grpcclient

            c = grpcclient.InferenceServerClient(
                self.url, ssl=self.ssl, root_certificates=self.root_certificates, private_key=self.private_key,
                certificate_chain=self.certificate_chain)
            self._local.client = c
            self._local.shared = shm.SharedInput(c, self.headers, self.timeout, self.server) if self.shared_memory else None
        return c

    def _inputs(self, inputs: Mapping[str, np.ndarray]) -> list[Any]:
        """tritonclient inputs: the first large numeric one through this thread's shared memory
        region (when on), the others as binary protobuf."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        shared = getattr(self._local, "shared", None)
        out = []
        for k, v in inputs.items():
            t = shared.place(k, v) if shared is not None else None
            if t is not None:
                shared = None  # one region per client: further inputs go on the wire
            else:
                t = grpcclient.InferInput(k, list(v.shape), "BYTES" if v.dtype == np.object_ else np_to_triton_dtype(v.dtype))
                t.set_data_from_numpy(v)
            out.append(t)
        return out

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
              parameters: Mapping[str, Any] | None = None) -> Any:
        """One inference request (retried like :meth:`call`); the tritonclient result."""
        import tritonclient.grpc as grpcclient

        outs = [grpcclient.InferRequestedOutput(o) for o in outputs]
        params = dict(parameters) if parameters else None

        def send(c: Any) -> Any:
            return c.infer(model, self._inputs(inputs), outputs=outs, headers=self.headers,
                           client_timeout=self.timeout, parameters=params)

        def run(c: Any) -> Any:
            try:
                return send(c)
            except Exception as exc:
                shared = getattr(self._local, "shared", None)
                if shared is None or not shared.registered or not shm.is_lost_region(exc):
                    raise
                shared.forget()  # the server restarted and lost the registration: register again, once
                return send(c)
        return self.call(model, run)

    def call(self, model: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``, retrying transient failures, mapping errors to Hygeia's."""
        for attempt in range(self.retries + 1):
            try:
                return fn(self.client())
            except Exception as exc:  # tritonclient raises InferenceServerException
                if not hasattr(exc, "status"):
                    raise
                status = str(exc.status() or "")
                retry = (status in _RETRYABLE and "restricted" not in str(exc)) or _STUB_RESTART in str(exc)
                if retry and attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise map_error(exc, model) from None
        raise AssertionError("unreachable")

    def model_config(self, model: str) -> dict[str, Any]:
        try:
            return self.call(model, lambda c: c.get_model_config(model, headers=self.headers, as_json=True,
                                                                 client_timeout=self.timeout))["config"]
        except PluginNotFoundError:
            kind, _, name = model.partition("_")
            raise PluginNotFoundError(f"remote {kind} at {self.server}", name, self.model_names(kind)) from None

    def model_names(self, kind: str | None = None) -> list[str]:
        """Models in the server's repository; with ``kind``: the plugin names of that kind."""
        try:
            idx = self.client().get_model_repository_index(headers=self.headers, as_json=True,
                                                            client_timeout=self.timeout)
            names = sorted(m["name"] for m in idx.get("models", []))
        except Exception:  # noqa: BLE001 - only used to enrich an error message
            return []
        if kind is None:
            return names
        return [n[len(kind) + 1:] for n in names if n.startswith(f"{kind}_")]
