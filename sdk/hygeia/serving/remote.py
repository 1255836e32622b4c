"""Remote plugins: the Generator / Conditioner / Diagnoser protocols over Triton gRPC.

``connect("diagnoser", "my-diagnoser", "127.0.0.1:8001")`` returns an object that behaves like the local
plugin: same attributes (``identity``, ``findings``, ``input_size``, ``condition_kinds`` ...),
same methods, same result dataclasses, same errors (bad input -> :class:`hygeia.errors.InputError`
with the server's message). Tensors travel as binary protobuf (never JSON). Transient
``UNAVAILABLE`` errors are retried with exponential back-off; every call has a deadline;
TLS and auth headers are optional. Several endpoints (``"h1:8001,h2:8001"``) spread the requests
over replicas and fail over when one is lost (:class:`hygeia.serving.endpoints.EndpointPool`).
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..api import Diagnosis, GeneratedImage, GeneratedMolecule, ModelIdentity
from .. import errors
from ..errors import HygeiaError, InputError, PluginNotFoundError
from ..validation import check_condition, check_images, check_n, check_seed, check_texts
from . import wire

ProgressFn = Callable[[int, int], None]


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


def _split_server(server: str) -> tuple[str, bool]:
    for prefix, tls in (("grpcs://", True), ("grpc://", False), ("https://", True), ("http://", False)):
        if server.startswith(prefix):
            return server[len(prefix):].rstrip("/"), tls
    return server, False


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
    """

    def __init__(self, server: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2,
                 ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: Mapping[str, str] | None = None,
                 token: str | None = None) -> None:
        self.url, tls = _split_server(server)
        if ":" not in self.url:
            raise InputError("server", "HOST:PORT of Triton's gRPC endpoint", got=repr(server))
        self.server = server
        self.ssl = ssl or tls or bool(root_certificates)
        self.root_certificates, self.private_key, self.certificate_chain = root_certificates, private_key, certificate_chain
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.headers: dict[str, str] = dict(headers or {})
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            import tritonclient.grpc as grpcclient

            c = grpcclient.InferenceServerClient(
                self.url, ssl=self.ssl, root_certificates=self.root_certificates, private_key=self.private_key,
                certificate_chain=self.certificate_chain)
            self._local.client = c
        return c

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


def _connection(server: str, **opts: Any) -> Any:
    """One endpoint (:class:`Connection`) or, for ``"h1:p,h2:p"``, an :class:`EndpointPool`."""
    if "," in server:
        from .endpoints import EndpointPool

        return EndpointPool(server, **opts)
    return Connection(server, **opts)


class _Remote:
    kind = ""

    def __init__(self, name: str, server: Any, **opts: Any) -> None:
        self.conn = server if not isinstance(server, str) else _connection(server, **opts)
        self.name = name
        self.model = wire.model_name(self.kind, name)
        cfg = self.conn.model_config(self.model)
        self.params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if self.params.get("hygeia_kind") != self.kind:
            raise PluginNotFoundError(f"remote {self.kind} at {self.conn.server}", name, self.conn.model_names(self.kind))
        self.max_batch_size = int(cfg.get("max_batch_size", 0)) or 1
        self.info = json.loads(self.params.get("hygeia_info", "{}"))
        self.identity = ModelIdentity(self.params.get("hygeia_identity_name") or name,
                                      self.params["hygeia_version"], self.kind,  # type: ignore[arg-type]
                                      self.params.get("hygeia_weights_sha256") or None)
        self.condition_kinds = frozenset(self.info.get("condition_kinds", []))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, server={self.conn.server!r})"

    def _infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
               parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        ins = []
        for k, v in inputs.items():
            t = grpcclient.InferInput(k, list(v.shape), "BYTES" if v.dtype == np.object_ else np_to_triton_dtype(v.dtype))
            t.set_data_from_numpy(v)
            ins.append(t)
        outs = [grpcclient.InferRequestedOutput(o) for o in outputs]
        res = self.conn.call(self.model, lambda c: c.infer(self.model, ins, outputs=outs, headers=self.conn.headers,
                                                           client_timeout=self.conn.timeout,
                                                           parameters=dict(parameters) if parameters else None))
        return {o: res.as_numpy(o) for o in outputs}


class RemoteConditioner(_Remote):
    """A :class:`hygeia.api.Conditioner` served by Triton."""

    kind = "conditioner"

    def __init__(self, name: str, server: Any, **opts: Any) -> None:
        super().__init__(name, server, **opts)
        self.dim = int(self.info["dim"])

    def encode(self, conditions: Sequence[Any]) -> Any:
        """``[B, dim]`` float32 (a torch tensor when torch is installed)."""
        if isinstance(conditions, (str, bytes)) or not isinstance(conditions, Sequence) or len(conditions) == 0:
            raise InputError("conditions", "a non-empty list of conditions", got=repr(conditions)[:100])
        texts = [wire.encode_condition(c) for c in conditions]
        if any(t is None for t in texts):
            raise InputError("conditions", "no None entries (a condition per row)", got=repr(list(conditions))[:100])
        chunks = []
        for i in range(0, len(texts), self.max_batch_size):
            part = texts[i:i + self.max_batch_size]
            chunks.append(self._infer({wire.CONDITION: wire.encode_strings(part)},  # type: ignore[arg-type]
                                      [wire.EMBEDDING])[wire.EMBEDDING])
        emb = np.concatenate(chunks).astype(np.float32, copy=False)
        try:
            import torch

            return torch.from_numpy(np.ascontiguousarray(emb))
        except ImportError:  # pragma: no cover
            return emb


class RemoteDiagnoser(_Remote):
    """A :class:`hygeia.api.Diagnoser` served by Triton."""

    kind = "diagnoser"

    def __init__(self, name: str, server: Any, **opts: Any) -> None:
        super().__init__(name, server, **opts)
        self.findings: tuple[str, ...] = tuple(self.info["findings"])
        self.input_size: tuple[int, int] = tuple(self.info["input_size"])  # type: ignore[assignment]
        self.channels = int(self.info.get("channels", 1))
        self.codes: dict[str, dict[str, str]] = self.info.get("codes", {})

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool | None = None
                 ) -> list[Diagnosis]:
        """One Diagnosis per image. ``heatmaps``: None = the model's default, False = none (faster),
        True = ask for them (models that cannot make them return none)."""
        a = check_images(images, size=self.input_size, channels=self.channels)
        tx = check_texts(texts, len(a))
        outputs = [wire.PROBS, wire.THRESHOLDS, wire.REGIONS] + ([wire.HEATMAPS] if heatmaps is not False else [])
        params = {"heatmaps": True} if heatmaps else None
        result: list[Diagnosis] = []
        for i in range(0, len(a), self.max_batch_size):
            inputs = {wire.IMAGES: a[i:i + self.max_batch_size]}
            if tx is not None:
                inputs[wire.TEXTS] = wire.encode_strings(tx[i:i + self.max_batch_size])
            out = self._infer(inputs, outputs, params)
            result += wire.decode_diagnoses(out, self.findings, self.identity, self.input_size, self.codes)
        return result


class RemoteGenerator(_Remote):
    """A :class:`hygeia.api.Generator` served by Triton; progress is streamed over gRPC."""

    kind = "generator"

    def __init__(self, name: str, server: Any, **opts: Any) -> None:
        super().__init__(name, server, **opts)
        self.output = self.info.get("output", "image")

    def generate(self, n: int, condition: Any = None, seed: int = 0, progress: ProgressFn | None = None,
                 **options: Any) -> list[GeneratedImage] | list[GeneratedMolecule]:
        """Like the local ``generate``; ``progress(done, total)`` is called as the server reports."""
        n, seed = check_n(n), check_seed(seed)
        check_condition(condition, self.condition_kinds, self.name)
        inputs = {wire.N: np.array([[n]], np.int64), wire.SEED: np.array([[seed]], np.int64)}
        cond = wire.encode_condition(condition)
        if cond is not None:
            inputs[wire.CONDITION] = wire.encode_strings([cond])
        if options:
            try:
                inputs[wire.OPTIONS] = wire.encode_strings([json.dumps(options)])
            except TypeError:
                raise InputError("options", "JSON-serialisable values", got=repr(options)[:100]) from None
        for attempt in range(self.conn.retries + 1):
            try:
                out = self._stream(inputs, progress)
                break
            except (ServerUnavailableError, RemoteError) as exc:
                retry = isinstance(exc, ServerUnavailableError) or _STUB_RESTART in str(exc)
                if not retry or attempt >= self.conn.retries or getattr(exc, "_partial", False):
                    raise
                time.sleep(self.conn.backoff * 2 ** attempt)
        return wire.decode_generated(out, served_by=f"triton://{self.conn.url}/{self.model}")

    def _stream(self, inputs: Mapping[str, np.ndarray], progress: ProgressFn | None) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        ins = []
        for k, v in inputs.items():
            t = grpcclient.InferInput(k, list(v.shape), "BYTES" if v.dtype == np.object_ else np_to_triton_dtype(v.dtype))
            t.set_data_from_numpy(v)
            ins.append(t)
        names = [wire.PROGRESS, wire.META] + ([wire.SMILES, wire.VALID] if self.output == "molecule" else [wire.IMAGES])
        q: "queue.Queue[tuple[Any, Any]]" = queue.Queue()
        client = self.conn.client()
        # no deadline on the whole stream (a long generation is fine while it reports progress):
        # ``timeout`` bounds the wait for each next message instead
        client.start_stream(callback=lambda result, error: q.put((result, error)), headers=self.conn.headers)
        got_any = False
        cancel = True
        try:
            client.async_stream_infer(self.model, ins, outputs=[grpcclient.InferRequestedOutput(o) for o in names])
            while True:
                try:
                    result, error = q.get(timeout=self.conn.timeout)
                except queue.Empty:
                    raise RemoteTimeoutError(f"no response from {self.model} in {self.conn.timeout:.0f} s") from None
                if error is not None:
                    err = map_error(error, self.model)
                    setattr(err, "_partial", got_any)
                    cancel = False
                    raise err
                got_any = True
                prog = result.as_numpy(wire.PROGRESS)
                data = result.as_numpy(wire.META)
                if progress is not None and prog is not None:
                    done, total = (int(x) for x in prog.reshape(-1)[:2])
                    progress(done, total)
                if data is not None:
                    cancel = False
                    return {o: result.as_numpy(o) for o in names}
        finally:
            client.stop_stream(cancel_requests=cancel)


REMOTE_KINDS: dict[str, type[_Remote]] = {
    "generator": RemoteGenerator, "conditioner": RemoteConditioner, "diagnoser": RemoteDiagnoser}


def connect(kind: str, name: str, server: str, **opts: Any) -> Any:
    """The plugin ``kind``/``name`` served by Triton at ``server`` (``HOST:PORT``, gRPC; several
    comma-separated endpoints spread requests and fail over, see :mod:`hygeia.serving.endpoints`).

    ``opts`` go to :class:`Connection`: ``timeout``, ``retries``, ``backoff``, ``ssl``,
    ``root_certificates``, ``private_key``, ``certificate_chain``, ``headers``, ``token``
    (and ``cooldown`` for several endpoints).
    """
    if kind not in REMOTE_KINDS:
        raise InputError("kind", "one of generator, conditioner, diagnoser", got=repr(kind))
    return REMOTE_KINDS[kind](name, server, **opts)
