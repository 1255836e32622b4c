"""Compiled execution of a diagnoser's network: ONNX Runtime or TorchScript instead of eager torch.

A diagnoser whose network is a ``torch.nn.Module`` mapping images ``[B, C, H, W]`` (float32) to
one tensor (logits or probabilities, ``[B, F]``) gets compiled execution for free. The network is
found through this protocol, on the plugin instance:

- ``compiled = False`` (class or instance attribute): opt out, always eager;
- ``export_module()``: returns ``(module, example)`` (the network its ``diagnose`` calls and an
  example batch ``[B, C, H, W]``), or ``None`` to opt out;
- otherwise the attribute ``net``, if it is a ``torch.nn.Module`` (example: zeros of the plugin's
  ``input_size``).

:func:`compile_plugin` exports the network (ONNX through ``torch.onnx.export`` with a dynamic
batch axis, or a frozen TorchScript trace), checks the compiled output against eager on a random
batch of two (max abs difference <= :data:`TOLERANCE`) and then routes the module's own forward
calls to the compiled graph, in place: the plugin's code is unchanged (thresholds, findings,
regions). Calls that need the eager network still get it: with gradients enabled (Grad-CAM),
with hooks on a submodule, in training mode, with other arguments than one image tensor of the
exported shape, or on another device. A network that cannot be exported stays eager and the
reason is logged in one line.

:func:`measure` times eager, TorchScript and ONNX at batch 1 and 32 and :func:`choose` picks the
fastest (``hygeia triton build`` records it in the model's config). ONNX Runtime's intra-op
threads follow ``torch.get_num_threads()`` (the cores, or ``OMP_NUM_THREADS``: 1 per Triton
stub); ``HYGEIA_COMPILED_THREADS`` overrides.
"""
from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "torchscript", "eager")
TOLERANCE = 1e-4
"""Largest accepted |compiled - eager| on the network's output at export."""
MARGIN = 0.9
"""A compiled runtime is chosen only if it takes at most this fraction of eager's time."""
THREADS_ENV = "HYGEIA_COMPILED_THREADS"


@dataclass
class Compiled:
    """What :func:`compile_plugin` did: the runtime in use, why not compiled, timings (ms)."""

    runtime: str
    reason: str = ""
    timings: dict[str, list[float]] = field(default_factory=dict)


def find_network(plugin: Any, size: Sequence[int] | None = None, channels: int = 1) -> tuple[Any, Any] | str:
    """``(module, example)`` of the plugin's network, or the reason it has none to compile."""
    import torch

    if getattr(plugin, "compiled", True) is False:
        return "the plugin opts out (compiled = False)"
    export = getattr(plugin, "export_module", None)
    if callable(export):
        got = export()
        if got is None:
            return "the plugin opts out (export_module() returned None)"
        module, example = got
    else:
        module = getattr(plugin, "net", None)
        if not isinstance(module, torch.nn.Module):
            return "no network found (no export_module() and no torch.nn.Module attribute 'net')"
        h, w = (int(v) for v in (size or plugin.input_size))
        example = torch.zeros(1, channels, h, w)
    if not isinstance(module, torch.nn.Module):
        return f"export_module() returned a {type(module).__name__}, not a torch.nn.Module"
    return module, example


def _threads() -> int:
    import torch

    return max(1, int(os.environ.get(THREADS_ENV) or torch.get_num_threads()))


def _onnx(module: Any, example: Any) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["images"], output_names=["out"],
                          dynamic_axes={"images": {0: "batch"}, "out": {0: "batch"}}, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = _threads(), 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[0]


def _torchscript(module: Any, example: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ts = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return ts(torch.from_numpy(x)).numpy()
    return run


def check_network(module: Any, example: Any) -> Any:
    """The example as float32 on CPU; ``ValueError`` (one line) if the network cannot be compiled here."""
    import torch

    p = next(module.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise ValueError(f"the network is on {p.device}; compiled execution runs on CPU here")
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError("the example input is not one tensor [B, C, H, W]")
    module.eval()
    example = example.float().cpu()
    try:
        with torch.no_grad():
            out = module(example)
    except Exception as exc:  # noqa: BLE001 - e.g. a forward that needs more inputs
        raise ValueError(f"its forward fails on one image tensor: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:200]}") from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"its forward returns {type(out).__name__}, not one tensor (e.g. it needs text too)")
    return example


def export(module: Any, example: Any, runtime: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``images (numpy [B, C, H, W] float32) -> output (numpy)`` running ``module`` compiled.

    Raises ``ValueError`` (one line) when the network cannot be compiled or disagrees with eager.
    """
    import torch

    if runtime not in ("onnx", "torchscript"):
        raise ValueError(f"unknown runtime {runtime!r}: expected onnx or torchscript")
    example = check_network(module, example)
    try:
        fn = (_onnx if runtime == "onnx" else _torchscript)(module, example)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: stay eager
        raise ValueError(f"{runtime} export failed: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:300]}") from None
    x = torch.rand(2, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x).numpy()
    got = fn(x.numpy())
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= TOLERANCE:
        raise ValueError(f"{runtime} output differs from eager by {diff:.2e} (> {TOLERANCE:g})")
    return fn


def install(module: Any, fn: Callable[[np.ndarray], np.ndarray], shape: Sequence[int], runtime: str) -> None:
    """Route ``module``'s eligible forward calls to ``fn`` (see the module docstring); :func:`uninstall` undoes it."""
    import torch

    subs = [m for m in module.modules() if m is not module]
    eager = type(module).forward
    want = tuple(int(s) for s in shape)
    hooks = torch.nn.modules.module

    def forward(*args: Any, **kw: Any) -> Any:
        x = args[0] if len(args) == 1 and not kw else None
        if (x is None or not isinstance(x, torch.Tensor) or torch.is_grad_enabled() or module.training
                or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or tuple(x.shape[1:]) != want
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in subs)):
            return eager(module, *args, **kw)
        return torch.from_numpy(fn(np.ascontiguousarray(x.numpy())))

    module.forward = forward
    module.hygeia_runtime = runtime


def uninstall(module: Any) -> None:
    """Back to eager forward calls."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("hygeia_runtime", None)


def _time(fn: Callable[[], Any], seconds: float, reps: int) -> float:
    fn()
    t0, n = time.perf_counter(), 0
    while n < reps or (time.perf_counter() - t0 < seconds and n < 50):
        fn()
        n += 1
    return 1e3 * (time.perf_counter() - t0) / n


def measure(module: Any, example: Any, batches: Sequence[int] = (1, 32), seconds: float = 0.3) -> dict[str, list[float]]:
    """Milliseconds per call of each runtime at each batch size (``{'eager': [...], 'onnx': [...], ...}``).

    A runtime that cannot be compiled is left out (its reason is logged)."""
    import torch

    shape = tuple(example.shape[1:])
    xs = [torch.rand(b, *shape, generator=torch.Generator().manual_seed(b)) for b in batches]
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        out["eager"] = [_time(lambda x=x: module(x), seconds, 3 if len(x) == 1 else 1) for x in xs]
    for rt in ("torchscript", "onnx"):
        try:
            fn = export(module, example, rt)
        except ValueError as exc:
            log.debug("%s: %s", rt, exc)
            continue
        arrays = [x.numpy() for x in xs]
        out[rt] = [_time(lambda a=a, f=fn: f(a), seconds, 3 if len(a) == 1 else 1) for a in arrays]
    return out


def choose(timings: dict[str, list[float]]) -> str:
    """The runtime with the lowest geometric-mean time over the batch sizes; compiled only if it
    takes at most :data:`MARGIN` of eager's time (a near tie stays eager)."""
    def score(ms: list[float]) -> float:
        return float(np.exp(np.mean(np.log(np.maximum(ms, 1e-9)))))

    best = min(timings, key=lambda k: score(timings[k]))
    if best != "eager" and "eager" in timings and score(timings[best]) > MARGIN * score(timings["eager"]):
        return "eager"
    return best


def compile_plugin(plugin: Any, runtime: str = "auto", size: Sequence[int] | None = None, channels: int = 1,
                   name: str = "") -> Compiled:
    """Compile ``plugin``'s network in place with ``runtime`` (``auto``: :func:`measure` then :func:`choose`).

    Never raises for a network that cannot be compiled: the result says ``eager`` and why, and
    that reason is logged in one line.
    """
    label = name or getattr(getattr(plugin, "identity", None), "name", type(plugin).__name__)
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"unknown runtime {runtime!r}: expected auto, onnx, torchscript or eager")
    if runtime == "eager":
        return Compiled("eager", "eager asked for")
    found = find_network(plugin, size, channels)
    if isinstance(found, str):
        log.info("compiled %s: eager, %s", label, found)
        return Compiled("eager", found)
    module, example = found
    uninstall(module)  # compile the eager network, never an earlier compiled one
    timings: dict[str, list[float]] = {}
    try:
        example = check_network(module, example)
        if runtime == "auto":
            timings = measure(module, example)
            runtime = choose(timings)
            if runtime == "eager":
                reason = ("no runtime could compile it" if len(timings) == 1 else
                          "eager measured fastest: " + ", ".join(f"{k} {v[0]:.2f} ms" for k, v in timings.items()))
                log.info("compiled %s: eager, %s", label, reason)
                return Compiled("eager", reason, timings)
        fn = export(module, example, runtime)
    except ValueError as exc:
        log.warning("compiled %s: eager, %s", label, exc)
        return Compiled("eager", str(exc), timings)
    install(module, fn, tuple(example.shape[1:]), runtime)
    return Compiled(runtime, "", timings)
