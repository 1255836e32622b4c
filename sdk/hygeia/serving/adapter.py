"""The Triton Python-backend model behind every generated ``triton_models/*/1/model.py``.

It reads the plugin's kind and name from the model config parameters, finds the plugin
through the plugin registry (loading only the entry point that registers it, so a stub does
not import every installed plugin), builds it on the instance's device, and converts tensors
<-> plugin calls with :mod:`hygeia.serving.wire`.

Errors: an :class:`hygeia.errors.InputError` becomes an ``INVALID_ARG`` error response carrying
its message (the client rebuilds the InputError); anything else becomes ``INTERNAL``. A bad
request never affects the other requests of a dynamic batch, and the model keeps serving.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..validation import check_images
from . import wire

PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress messages a second per request
WARM_TAG = "hygeia-warm"  # log tag of the build outcome (read by TritonServer.wait_warm)
WARM_NICE = 10  # niceness of the background build thread


class _Cancelled(Exception):
    pass


def _lookup(kind: str, name: str, entry_point: str) -> Any:
    """The plugin spec, loading only its own entry point when known (fast stub start)."""
    from ..plugins import PluginRegistry, get_registry
    from .repository import find_entry_point

    ep = find_entry_point(entry_point) if entry_point else None
    if ep is not None:
        reg = PluginRegistry(load_entry_points=False)
        reg.register(ep.load(), name=ep.name, package=ep.dist.name if ep.dist is not None else "?")
        try:
            return reg.get(kind, name)  # type: ignore[arg-type]
        except LookupError:
            pass
    return get_registry().get(kind, name)  # type: ignore[arg-type]


def _accepts(fn: Callable[..., Any], param: str) -> bool:
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class TritonPythonModel:
    """Serves one Hygeia plugin (any kind) in Triton's Python backend."""

    def initialize(self, args: dict[str, str]) -> None:
        """Parse the config and return at once; the plugin is built by :meth:`_warm` in a thread.

        Importing torch, MONAI, diffusers and transformers costs several CPU seconds per stub
        (``import monai.networks.nets`` alone: ~6 s here); done inside ``initialize`` by every stub
        at once, a 2-core host needed ~30 s before the repository was ready. The model is ready as
        soon as its config is read; the build runs in a background thread at lower CPU priority
        (so the other stubs start first) and the first request waits for it. The outcome is
        logged as ``hygeia-warm MODEL ok|failed: REASON`` (what :meth:`TritonServer.wait_warm`
        reads); a failed build (e.g. stale weights) makes every request fail with that reason.
        ``HYGEIA_EAGER_LOAD=1`` builds inside ``initialize`` instead (a failure then fails the load).
        """
        import triton_python_backend_utils as pb  # only exists inside the stub

        self.pb = pb
        self.configure(args)
        if os.environ.get("HYGEIA_EAGER_LOAD", "") not in ("", "0"):
            self._warm()
        else:
            threading.Thread(target=self._warm, args=(WARM_NICE,), daemon=True,
                             name=f"hygeia-warm-{self.model_name}").start()

    def configure(self, args: dict[str, str]) -> None:
        """What the model is, from Triton's ``initialize`` arguments (no stub needed: the container
        packer builds models with it, :mod:`hygeia.serving.pack`)."""
        self.pb = getattr(self, "pb", None)
        self.config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.config.get("name", "?"))
        self.model_dir = args.get("model_repository", "")  # this model's folder (a bundle of its own lives there)
        self.version = args.get("model_version", "1") or "1"
        p = {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}
        self.params = p
        self.kind, self.name = p["hygeia_kind"], p["hygeia_name"]
        self.info = json.loads(p.get("hygeia_info", "{}"))
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.device = device
        self.plugin: Any = None
        self.runtime = ""
        self.size: tuple[int, ...] | None = None  # a diagnoser's input size and channels, once built
        self.channels = 1
        self._failure: BaseException | None = None
        self._warmed = threading.Event()
        self._execute = {"diagnoser": self._diagnose, "conditioner": self._condition,
                         "generator": self._generate}[self.kind]

    def _warm(self, nice: int = 0) -> None:
        """Find and build the plugin, check its identity against the config, log the outcome."""
        t0 = time.monotonic()
        if nice:
            try:  # Linux: the priority of this thread only
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except (OSError, AttributeError):  # pragma: no cover
                pass
        try:
            self._build()
            self._log("info", f"{WARM_TAG} {self.model_name} ok after {time.monotonic() - t0:.1f} s: serving "
                              f"{self.kind} {self.name!r} v{self.plugin.identity.version} on {self.device}"
                              f"{self.runtime}")
        except BaseException as exc:
            self._failure = exc
            self.plugin = None
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one log line
            self._log("error", f"{WARM_TAG} {self.model_name} failed: {reason}")
            self._log("verbose", traceback.format_exc())
            if not nice:  # eager: fail the load itself
                raise
        finally:
            self._warmed.set()

    def _build(self) -> None:
        p = self.params
        if self._build_frozen():
            return
        spec = _lookup(self.kind, self.name, p.get("hygeia_entry_point", ""))
        opts: dict[str, Any] = {"device": self.device} if _accepts(spec.factory, "device") else {}
        if p.get("hygeia_bundle"):  # `hygeia triton build --bundle NAME=PATH`: the copy beside the config
            opts["bundle"] = os.path.join(self.model_dir, p["hygeia_bundle"])
        plugin = spec.factory(**opts)
        self._check_identity(plugin.identity, "the installed plugin is")
        self._serve(plugin)
        if self.kind in ("diagnoser", "generator"):
            self.runtime = self._compile(plugin) + self.runtime
        self.plugin = plugin

    def _check_identity(self, ident: Any, holder: str) -> None:
        """RuntimeError (the model is stale) unless ``ident`` is the version and weights the config describes."""
        want = (self.params.get("hygeia_version"), self.params.get("hygeia_weights_sha256") or None)
        if (ident.version, ident.weights_sha256) != want:
            raise RuntimeError(
                f"model {self.model_name} is stale: its config describes version {want[0]} weights "
                f"{want[1]}, {holder} version {ident.version} weights {ident.weights_sha256}; "
                "run `hygeia triton build` to refresh the repository")

    def _build_frozen(self) -> bool:
        """Serve the runner of the model's frozen folder (:mod:`hygeia.frozen`: no torch) when its
        config names one; False (the reason kept for the log line) to build the plugin instead."""
        from .runtime import FROZEN_PARAM, frozen_runner

        if not self.params.get(FROZEN_PARAM):
            return False
        runner, why = frozen_runner(os.path.join(self.model_dir, self.version), self.device)
        if runner is None:
            self.runtime = f"; frozen graphs not used: {why}"
            return False
        self._check_identity(runner.identity, "its frozen folder holds")
        self._serve(runner)
        self.runtime = f", runtime onnx (frozen graphs, no torch: {self.params[FROZEN_PARAM]})"
        self.plugin = runner
        return True

    def _serve(self, plugin: Any) -> None:
        """What the request handlers need to know about the plugin (or frozen runner) they call."""
        if self.kind == "diagnoser":
            self.labels = list(self.info["findings"])
            self.size = tuple(self.info["input_size"])
            self.channels = int(self.info.get("channels", 1))
            self.heatmap_kw = next((k for k in ("heatmaps", "heatmap", "gradcam")
                                    if _accepts(plugin.diagnose, k)), None)
            self.present_maps = "present" in getattr(plugin, "heatmap_modes", ())
        if self.kind == "generator":
            self.takes_progress = _accepts(plugin.generate, "progress")

    def _compile(self, plugin: Any) -> str:
        """Run the plugin's networks with the runtime its config records (``HYGEIA_RUNTIME`` overrides);
        returns the tail of the warm log line: the runtime, and why eager where it could not compile."""
        from ..compiled import compile_plugin

        want = os.environ.get("HYGEIA_RUNTIME") or self.params.get("hygeia_runtime") or "eager"
        if want == "eager" or self.device != "cpu":
            why = self.params.get("hygeia_runtime_reason", "") if want == "eager" else "onnxruntime is CPU-only"
            return f", runtime eager{': ' + why if why else ''}"
        res = compile_plugin(plugin, want, size=self.size, channels=self.channels, name=self.model_name)
        return f", runtime {res.runtime}{': ' + res.reason if res.reason else ''}"

    # ----------------------------------------------------------------- helpers
    def _log(self, level: str, msg: str) -> None:
        logger = getattr(self.pb, "Logger", None)
        if logger is not None:
            getattr(logger, f"log_{level}")(msg)
        else:  # pragma: no cover
            print(msg, file=sys.stderr)

    def _error(self, exc: BaseException) -> Any:
        pb = self.pb
        if isinstance(exc, InputError):  # "InputError: invalid X: expected ..., got ..." (class kept for the client)
            return pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}", pb.TritonError.INVALID_ARG))
        self._log("error", f"{self.model_name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}", pb.TritonError.INTERNAL))

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def _response(self, outputs: dict[str, np.ndarray]) -> Any:
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in outputs.items()])

    def execute(self, requests: list[Any]) -> list[Any] | None:
        self._warmed.wait()
        if self._failure is not None:
            exc = RuntimeError(f"model {self.model_name} could not be built: "
                               f"{type(self._failure).__name__}: {self._failure}")
            if self.kind != "generator":
                return [self._error(exc) for _ in requests]
            for r in requests:  # decoupled: answer through each request's sender
                r.get_response_sender().send(self._error(exc), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        return self._execute(requests)

    def finalize(self) -> None:
        self.plugin = None

    # ----------------------------------------------------------------- diagnoser
    def _diagnose_call(self, images: np.ndarray, texts: list[str] | None, want: tuple[bool | str | None, bool]
                       ) -> dict[str, np.ndarray]:
        """``want``: (what the plugin is asked for, whether the maps travel back). The first is False
        = no maps; None = the plugin's default; True = every map; ``"present"`` = the present
        findings' maps (the others travel as NaN, decoded as None)."""
        heatmaps, send = want
        kw = {self.heatmap_kw: heatmaps} if self.heatmap_kw and heatmaps is not None else {}
        result = self.plugin.diagnose(images, texts, **kw)
        if len(result) != len(images):
            raise RuntimeError(f"{self.name}.diagnose returned {len(result)} results for {len(images)} images")
        return wire.encode_diagnoses(result, self.labels, heatmaps=send and heatmaps is not False)

    def _want_heatmaps(self, request: Any) -> tuple[bool | str | None, bool]:
        """(what to ask the plugin for, whether to send the maps). The request parameter
        ``heatmaps``: ``"present"`` asks for the present findings' maps where the plugin offers it
        (``heatmap_modes``; else every map, a superset of what was asked); ``"regions"`` asks the
        same and sends the regions without the maps (the HEATMAPS output is not requested then)."""
        try:
            value = json.loads(request.parameters() or "{}").get("heatmaps")
        except (ValueError, AttributeError):
            value = None
        present = "present" if self.present_maps else True
        if value == "regions":
            return present, False
        if wire.HEATMAPS not in request.requested_output_names():
            return False, False
        if value == "present":
            return present, True
        return (None if value is None else bool(value)), True

    def _diagnose(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[bool, bool | str | None], list[tuple[int, np.ndarray, list[str] | None]]] = {}
        for i, r in enumerate(requests):
            try:
                raw = self._input(r, wire.IMAGES)
                if raw is None:
                    raise InputError(wire.IMAGES, "an FP32 tensor [B, C, H, W]", got="no IMAGES input")
                imgs = check_images(raw, size=self.size, channels=self.channels, name=wire.IMAGES)  # type: ignore[arg-type]
                tx = self._input(r, wire.TEXTS)
                texts = wire.decode_strings(tx, wire.TEXTS) if tx is not None else None
                if texts is not None and len(texts) != len(imgs):
                    raise InputError(wire.TEXTS, f"one text per image ({len(imgs)})", got=f"{len(texts)} texts")
                want = self._want_heatmaps(r)
                groups.setdefault((texts is None, want), []).append((i, imgs, texts))
            except Exception as exc:
                responses[i] = self._error(exc)
        for (no_text, want), items in groups.items():
            try:
                images = np.concatenate([im for _, im, _ in items])
                texts = None if no_text else [t for _, _, ts in items for t in ts]  # type: ignore[union-attr]
                out = self._diagnose_call(images, texts, want)
                start = 0
                for i, im, _ in items:
                    stop = start + len(im)
                    responses[i] = self._response({k: v[start:stop] for k, v in out.items()})
                    start = stop
            except Exception:
                for i, im, ts in items:  # isolate the bad request: run each alone
                    try:
                        responses[i] = self._response(self._diagnose_call(im, ts, want))
                    except Exception as exc:
                        responses[i] = self._error(exc)
        return responses

    # ----------------------------------------------------------------- conditioner
    def _encode(self, conditions: list[Any]) -> np.ndarray:
        emb = self.plugin.encode(conditions)
        if hasattr(emb, "detach"):
            emb = emb.detach().float().cpu().numpy()
        return np.asarray(emb, np.float32)

    def _condition(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        items: list[tuple[int, list[Any]]] = []
        for i, r in enumerate(requests):
            try:
                conds = [wire.decode_condition(s) for s in wire.decode_strings(self._input(r, wire.CONDITION), wire.CONDITION)]
                if not conds:
                    raise InputError(wire.CONDITION, "at least one condition", got="none")
                items.append((i, conds))
            except Exception as exc:
                responses[i] = self._error(exc)
        if items:
            try:
                emb = self._encode([c for _, cs in items for c in cs])
                start = 0
                for i, cs in items:
                    responses[i] = self._response({wire.EMBEDDING: emb[start:start + len(cs)]})
                    start += len(cs)
            except Exception:
                for i, cs in items:
                    try:
                        responses[i] = self._response({wire.EMBEDDING: self._encode(cs)})
                    except Exception as exc:
                        responses[i] = self._error(exc)
        return responses

    # ----------------------------------------------------------------- generator
    def _scalar(self, request: Any, name: str) -> int:
        a = self._input(request, name)
        if a is None or a.size != 1:
            raise InputError(name, "one INT64 value (shape [1, 1]): one generate() call per request",
                             got="nothing" if a is None else f"shape {list(a.shape)}")
        return int(a.reshape(-1)[0])

    def _generate(self, requests: list[Any]) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for r in requests:
            sender = r.get_response_sender()
            try:
                n, seed = self._scalar(r, wire.N), self._scalar(r, wire.SEED)
                c = self._input(r, wire.CONDITION)
                cond = wire.decode_condition(wire.decode_strings(c, wire.CONDITION)[0]) if c is not None else None
                o = self._input(r, wire.OPTIONS)
                options: dict[str, Any] = {}
                if o is not None:
                    text = wire.decode_strings(o, wire.OPTIONS)[0]
                    try:
                        options = json.loads(text) if text.strip() else {}
                    except json.JSONDecodeError as exc:
                        raise InputError(wire.OPTIONS, "a JSON object", got=f"invalid JSON ({exc})") from None
                    if not isinstance(options, dict):
                        raise InputError(wire.OPTIONS, "a JSON object", got=type(options).__name__)
                    if "progress" in options:
                        raise InputError(wire.OPTIONS, "no 'progress' key (progress is streamed)", got="'progress'")
                last: list[Any] = [0.0, (n, n)]  # time of the last message, last (done, total) seen

                def progress(done: int, total: int) -> None:
                    if r.is_cancelled():
                        raise _Cancelled()
                    last[1] = (int(done), int(total))
                    now = time.monotonic()
                    if done >= total or now - last[0] >= PROGRESS_INTERVAL_S:
                        last[0] = now
                        sender.send(self._response({wire.PROGRESS: np.array([[done, total]], np.int64)}))

                kw = {"progress": progress} if self.takes_progress else {}
                if not self.takes_progress:
                    progress(0, n)
                items = self.plugin.generate(n, condition=cond, seed=seed, **options, **kw)
                out = wire.encode_generated(items)
                done, total = last[1]
                out[wire.PROGRESS] = np.array([[max(done, total), total]], np.int64)
                sender.send(self._response(out), flags=final)
            except _Cancelled:
                sender.send(flags=final)
            except Exception as exc:
                sender.send(self._error(exc), flags=final)
        return None


if os.environ.get("HYGEIA_SERVING_DEBUG"):  # pragma: no cover
    print(f"hygeia.serving.adapter loaded in pid {os.getpid()}", file=sys.stderr)
