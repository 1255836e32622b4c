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
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..api import Diagnosis, GeneratedImage, GeneratedMolecule, ModelIdentity
from ..errors import InputError, PluginNotFoundError
from ..validation import check_condition, check_heatmaps, check_images, check_n, check_seed, check_texts
from . import wire
from .connection import (  # noqa: F401  (public names, kept here for callers)
    _STUB_RESTART,
    Connection,
    RemoteError,
    RemoteTimeoutError,
    ServerUnavailableError,
    map_error,
)

ProgressFn = Callable[[int, int], None]


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
        res = self.conn.infer(self.model, inputs, outputs, parameters)
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
    heatmap_modes = (False, True, "present", "regions")
    """What ``diagnose(heatmaps=...)`` takes besides None. ``"present"``: maps (and so regions) of the
    findings called present only, where the served plugin offers it; one that does not answers
    with every finding's map. ``"regions"``: the server makes the same maps but sends only the
    regions (no map travels; every ``heatmap`` is None), what a DICOM SR needs."""

    def __init__(self, name: str, server: Any, **opts: Any) -> None:
        super().__init__(name, server, **opts)
        self.findings: tuple[str, ...] = tuple(self.info["findings"])
        self.input_size: tuple[int, int] = tuple(self.info["input_size"])  # type: ignore[assignment]
        self.channels = int(self.info.get("channels", 1))
        self.codes: dict[str, dict[str, str]] = self.info.get("codes", {})

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool | str | None = None
                 ) -> list[Diagnosis]:
        """One Diagnosis per image. ``heatmaps``: None = the model's default, False = none (faster),
        True = ask for them (models that cannot make them return none), ``"present"`` = the maps
        of the findings called present, ``"regions"`` = their regions without the maps (see
        :attr:`heatmap_modes`)."""
        check_heatmaps(heatmaps, self.heatmap_modes)
        a = check_images(images, size=self.input_size, channels=self.channels)
        tx = check_texts(texts, len(a))
        maps = heatmaps is not False and heatmaps != "regions"
        outputs = [wire.PROBS, wire.THRESHOLDS, wire.REGIONS] + ([wire.HEATMAPS] if maps else [])
        params = {"heatmaps": heatmaps} if heatmaps else None
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
    ``root_certificates``, ``private_key``, ``certificate_chain``, ``headers``, ``token``,
    ``shared_memory`` (images through system shared memory to a server on this host)
    (and ``cooldown`` for several endpoints).
    """
    if kind not in REMOTE_KINDS:
        raise InputError("kind", "one of generator, conditioner, diagnoser", got=repr(kind))
    return REMOTE_KINDS[kind](name, server, **opts)
