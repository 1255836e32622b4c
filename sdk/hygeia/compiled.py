"""Compiled execution of a plugin's network: ONNX Runtime or TorchScript instead of eager torch.

A plugin whose network is a ``torch.nn.Module`` gets compiled execution for free. The network is
found through this protocol, on the plugin instance:

- ``compiled = False`` (class or instance attribute): opt out, always eager;
- ``export_module()``: returns ``(module, example)`` (the network the plugin calls and an example
  of its arguments), a list of such pairs (several networks, e.g. a text encoder and the fusion
  network; the first is the one timed), or ``None`` to opt out. ``example`` is one tensor, a tuple
  of positional arguments (tensors, or ``None`` for an optional argument left out), or a list of
  such tuples when the plugin calls the network in several ways (e.g. with and without text);
  each way is compiled;
- otherwise the attribute ``net``, if it is a ``torch.nn.Module`` (a diagnoser: example zeros of
  the plugin's ``input_size``).

The network's output may be a tensor, a tuple of tensors or a mapping of tensors (a dict, or a
diffusers or transformers output class); it comes back in the same form. The batch axis is
dynamic; other axes are fixed to the example's unless the argument is wrapped in
:class:`Dynamic` (e.g. token length). A call whose arguments have other fixed sizes runs eager.

:func:`compile_plugin` exports the network (ONNX through ``torch.onnx.export``, or a frozen
TorchScript trace), checks the compiled output against eager on the example and on random inputs
of its shape (max abs difference <= :data:`TOLERANCE`) and then routes the module's own forward
calls to the compiled graph, in place: the plugin's code is unchanged (thresholds, findings,
regions, samplers). Calls that need the eager network still get it: with gradients enabled
(Grad-CAM), with hooks on a submodule, in training mode, with arguments that match no compiled
way (other dtypes, ranks or image shape, a tensor where ``None`` was exported, keyword options
away from their defaults), or on another device. A network that cannot be exported stays eager
and the reason is logged in one line.

:func:`measure` times eager, TorchScript and ONNX at batch 1 and 32 and :func:`choose` picks the
fastest (``hygeia triton build`` records it in the model's config). ONNX Runtime's intra-op
threads follow ``torch.get_num_threads()`` (the cores, or ``OMP_NUM_THREADS``: 1 per Triton
stub); ``HYGEIA_COMPILED_THREADS`` overrides.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._graphs import (  # noqa: F401  (THREADS_ENV, Dynamic and threads are part of this module's API)
    THREADS_ENV,
    Dynamic,
    assemble,
    batched,
    flatten,
    halved,
    layout_of,
    leaves,
    one_line,
    onnx_graph,
    randomised,
    rebuild,
    threads,
    torchscript_graph,
)

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "torchscript", "eager")
TOLERANCE = 1e-4
"""Largest accepted |compiled - eager| on the network's output at export."""
MARGIN = 0.9
"""A compiled runtime is chosen only if it takes at most this fraction of eager's time."""


@dataclass
class Compiled:
    """What :func:`compile_plugin` did: the runtime in use, why not compiled, timings (ms)."""

    runtime: str
    reason: str = ""
    timings: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Graph:
    """One compiled way of calling the network: ``run`` maps the argument tensors (numpy, in
    ``layout`` order) to the flat outputs (numpy); ``layout`` gives each positional argument as
    ``None``, ``"t"`` (a tensor) or a mapping's sorted keys; ``specs`` each tensor's dtype and
    shape (None: the batch axis or another dynamic axis),
    ``out`` how to rebuild the output (``("tensor",)``, ``("tuple", type)`` or ``("map", type, keys)``)."""

    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    layout: tuple[Any, ...]
    specs: tuple[tuple[Any, tuple[int | None, ...]], ...]
    out: tuple[Any, ...]


def find_network(plugin: Any, size: Sequence[int] | None = None,
                 channels: int = 1) -> list[tuple[Any, list[tuple[Any, ...]]]] | str:
    """``[(module, ways), ...]``: the plugin's networks (each way a tuple of example arguments), or
    the reason it has none to compile."""
    import torch

    if getattr(plugin, "compiled", True) is False:
        return "the plugin opts out (compiled = False)"
    export = getattr(plugin, "export_module", None)
    if callable(export):
        got = export()
        if got is None:
            return "the plugin opts out (export_module() returned None)"
        pairs = got if isinstance(got, list) else [got]
    else:
        module = getattr(plugin, "net", None)
        if not isinstance(module, torch.nn.Module):
            return "no network found (no export_module() and no torch.nn.Module attribute 'net')"
        hw = size or getattr(plugin, "input_size", None)
        if hw is None:
            return "no export_module() and no input_size to build an example for its network 'net'"
        h, w = (int(v) for v in hw)
        pairs = [(module, torch.zeros(1, channels, h, w))]
    out = []
    for module, example in pairs:
        if not isinstance(module, torch.nn.Module):
            return f"export_module() returned a {type(module).__name__}, not a torch.nn.Module"
        ways = example if isinstance(example, list) else [example]
        out.append((module, [w if isinstance(w, tuple) else (w,) for w in ways]))
    return out


def method_module(module: Any, method: str) -> Any:
    """A ``torch.nn.Module`` whose forward calls ``module.<method>`` (e.g. an autoencoder's
    ``decode``): call it in the plugin and name it in ``export_module()`` to compile that method."""
    import torch

    class Method(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any, **kw: Any) -> Any:
            return getattr(self.inner, method)(*args, **kw)

    Method.__name__ = Method.__qualname__ = f"{type(module).__name__}.{method}"
    return Method().eval()


def _on_cpu(a: Any) -> Any:
    if isinstance(a, Dynamic):
        return Dynamic(_on_cpu(a.tensor), a.axes)
    return a.detach().cpu() if hasattr(a, "detach") else a


def check_network(module: Any, ways: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The example arguments on CPU; ``ValueError`` (one line) if the network cannot be compiled here."""
    import torch

    p = next(module.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise ValueError(f"the network is on {p.device}; compiled execution runs on CPU here")
    module.eval()
    out = []
    for args in ways:
        args = tuple({k: _on_cpu(v) for k, v in a.items()} if isinstance(a, Mapping) else _on_cpu(a) for a in args)
        xs = leaves(args)[0]
        if not args or not isinstance(args[0], (torch.Tensor, Dynamic)) or xs[0].dim() < 1 or any(
                not isinstance(x, torch.Tensor) for x in xs) or any(isinstance(a, Mapping) and not a for a in args):
            raise ValueError("the example is not a tensor or a tuple of tensors (None for one left out, "
                             "or a mapping of tensors)")
        try:
            with torch.no_grad():
                res = module(*assemble(layout_of(args), xs))
        except Exception as exc:  # noqa: BLE001 - e.g. a forward that needs more inputs
            raise ValueError(f"its forward fails on the example: {one_line(exc)}") from None
        flatten(res)
        out.append(args)
    return out


def export(module: Any, example: Any, runtime: str) -> Graph:
    """One way of calling ``module`` (``example``: a tensor or a tuple of arguments), compiled.

    Raises ``ValueError`` (one line) when the network cannot be compiled or disagrees with eager.
    """
    import torch

    if runtime not in ("onnx", "torchscript"):
        raise ValueError(f"unknown runtime {runtime!r}: expected onnx or torchscript")
    wrapped = check_network(module, [example if isinstance(example, tuple) else (example,)])[0]
    try:
        fn = (onnx_graph if runtime == "onnx" else torchscript_graph)(module, wrapped)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: stay eager
        raise ValueError(f"{runtime} export failed: {one_line(exc, 300)}") from None
    layout = layout_of(wrapped)
    xs, axes = leaves(wrapped)
    how: tuple[Any, ...] = ()
    trials = [xs, randomised(xs, 0), batched(xs, 3, 1)] + ([halved(xs, axes)] if any(axes) else [])
    for trial in trials:
        with torch.no_grad():
            want, how = flatten(module(*assemble(layout, trial)))
        try:
            got = fn([a.numpy() for a in trial])
        except Exception as exc:  # noqa: BLE001 - e.g. an input the graph cannot take
            raise ValueError(f"{runtime} graph fails on the example: {one_line(exc)}") from None
        diff = max((float(np.abs(g - w.numpy()).max()) if g.shape == tuple(w.shape) else float("inf"))
                   for g, w in zip(got, want)) if len(got) == len(want) else float("inf")
        if not diff <= TOLERANCE:
            raise ValueError(f"{runtime} output differs from eager by {diff:.2e} (> {TOLERANCE:g})")
    specs = tuple((a.dtype, tuple(None if i == 0 or i in ax else n for i, n in enumerate(a.shape)))
                  for a, ax in zip(xs, axes))
    return Graph(fn, layout, specs, how)


def _match(graph: Graph, values: list[Any]) -> list[Any] | None:
    """The call's argument tensors in the graph's layout order, or None if the graph does not fit the call."""
    import torch

    if len(values) < len(graph.layout):
        return None
    xs: list[Any] = []
    for v, lay in zip(values, graph.layout):
        if lay is None:
            if v is not None:
                return None
        elif lay == "t":
            xs.append(v)
        elif isinstance(v, Mapping) and tuple(sorted(v)) == lay:
            xs.extend(v[k] for k in lay)
        else:
            return None
    if len(xs) != len(graph.specs):
        return None
    for x, (dtype, shape) in zip(xs, graph.specs):
        if (not isinstance(x, torch.Tensor) or x.dtype != dtype or x.dim() != len(shape)
                or any(n is not None and n != m for n, m in zip(shape, x.shape)) or x.device.type != "cpu"):
            return None
    return xs


def _is_default(param: inspect.Parameter, value: Any) -> bool:
    """Whether a call left ``param`` (beyond the compiled arguments) as the graph was exported with it."""
    if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        return not value
    return value is param.default or (isinstance(value, (bool, int, float, str)) and value == param.default)


def install(module: Any, graphs: Graph | Sequence[Graph], runtime: str) -> None:
    """Route ``module``'s eligible forward calls to the compiled ``graphs`` (see the module
    docstring); :func:`uninstall` undoes it."""
    import torch

    graphs = [graphs] if isinstance(graphs, Graph) else list(graphs)
    subs = [m for m in module.modules() if m is not module]
    eager = type(module).forward
    sig = inspect.signature(eager)
    params = list(sig.parameters.values())[1:]
    hooks = torch.nn.modules.module

    def forward(*args: Any, **kw: Any) -> Any:
        if not (torch.is_grad_enabled() or module.training or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks for m in subs)):
            try:
                bound = sig.bind(module, *args, **kw)
                bound.apply_defaults()
            except TypeError:
                bound = None
            if bound is not None:
                values = [bound.arguments[p.name] for p in params]
                for g in graphs:
                    n = len(g.layout)
                    xs = _match(g, values)
                    if xs is not None and all(_is_default(p, v) for p, v in zip(params[n:], values[n:])):
                        try:
                            return rebuild([torch.from_numpy(o) for o in g.run([np.ascontiguousarray(x.numpy())
                                                                                for x in xs])], g.out)
                        except Exception as exc:  # noqa: BLE001 - never fail a call eager would answer
                            graphs.remove(g)  # once: later calls of this way run eager
                            log.warning("compiled %s: eager from now on for these inputs, %s",
                                        type(module).__name__, one_line(exc))
                            break
        return eager(module, *args, **kw)

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
    """Milliseconds per call of each runtime at each batch size (``{'eager': [...], 'onnx': [...], ...}``),
    on the first way of calling the network. A runtime that cannot be compiled is left out (its
    reason is logged)."""
    import torch

    way = example[0] if isinstance(example, list) else example if isinstance(example, tuple) else (example,)
    layout = layout_of(way)
    trials = [batched(leaves(way)[0], b, b) for b in batches]
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        out["eager"] = [_time(lambda t=t: module(*assemble(layout, t)), seconds, 3 if b == 1 else 1)
                        for t, b in zip(trials, batches)]
    for rt in ("torchscript", "onnx"):
        try:
            g = export(module, way, rt)
        except ValueError as exc:
            log.debug("%s: %s", rt, exc)
            continue
        arrays = [[a.numpy() for a in t] for t in trials]
        out[rt] = [_time(lambda a=a, f=g.run: f(a), seconds, 3 if b == 1 else 1) for a, b in zip(arrays, batches)]
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
    for module, _ in found:
        uninstall(module)  # compile the eager networks, never earlier compiled ones
    (module, ways), timings = found[0], {}
    try:
        ways = check_network(module, ways)
        if runtime == "auto":
            timings = measure(module, ways[0])
            runtime = choose(timings)
            if runtime == "eager":
                reason = ("no runtime could compile it" if len(timings) == 1 else
                          "eager measured fastest: " + ", ".join(f"{k} {v[0]:.2f} ms" for k, v in timings.items()))
                log.info("compiled %s: eager, %s", label, reason)
                return Compiled("eager", reason, timings)
        done = [(module, [export(module, w, runtime) for w in ways])]
    except ValueError as exc:
        log.warning("compiled %s: eager, %s", label, exc)
        return Compiled("eager", str(exc), timings)
    notes = []
    for extra, extra_ways in found[1:]:  # further networks follow the first one's runtime
        try:
            done.append((extra, [export(extra, w, runtime) for w in check_network(extra, extra_ways)]))
        except ValueError as exc:
            log.warning("compiled %s: %s stays eager, %s", label, type(extra).__name__, exc)
            notes.append(f"{type(extra).__name__} eager: {exc}")
    for m, graphs in done:
        install(m, graphs, runtime)
    return Compiled(runtime, "; ".join(notes), timings)
