"""How :mod:`hygeia.compiled` turns a network into a graph: example arguments (:class:`Dynamic`
axes), flat outputs and their rebuilding, the ONNX Runtime and TorchScript exporters, and the
example variants the parity check and the timings use."""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THREADS_ENV = "HYGEIA_COMPILED_THREADS"


@dataclass
class Dynamic:
    """An example argument whose ``axes`` (besides the batch axis 0) vary between calls."""

    tensor: Any
    axes: tuple[int, ...]


def layout_of(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """How a way of calling is laid out: per argument ``None``, ``"t"`` (a tensor) or the sorted
    keys of a mapping of tensors."""
    return tuple(None if a is None else tuple(sorted(a)) if isinstance(a, Mapping) else "t" for a in args)


def leaves(args: tuple[Any, ...]) -> tuple[list[Any], list[tuple[int, ...]]]:
    """The tensors of a way of calling in layout order (mappings by sorted key), and each one's
    dynamic axes besides the batch."""
    xs: list[Any] = []
    axes: list[tuple[int, ...]] = []
    for a in args:
        for t in [] if a is None else [a[k] for k in sorted(a)] if isinstance(a, Mapping) else [a]:
            xs.append(t.tensor if isinstance(t, Dynamic) else t)
            axes.append(tuple(t.axes) if isinstance(t, Dynamic) else ())
    return xs, axes


def assemble(layout: tuple[Any, ...], xs: Sequence[Any]) -> tuple[Any, ...]:
    """The positional arguments again from their tensors (the inverse of :func:`leaves`)."""
    it = iter(xs)
    return tuple(None if lay is None else next(it) if lay == "t" else {k: next(it) for k in lay} for lay in layout)


def threads() -> int:
    import torch

    return max(1, int(os.environ.get(THREADS_ENV) or torch.get_num_threads()))


def flatten(out: Any) -> tuple[list[Any], tuple[Any, ...]]:
    """The output's tensors in order and how to rebuild it; ``ValueError`` for anything else."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out], ("tensor",)
    if isinstance(out, Mapping) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        return list(out.values()), ("map", type(out), tuple(out))
    if isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out):
        return list(out), ("tuple", type(out))
    raise ValueError(f"its forward returns {type(out).__name__}, not a tensor, a tuple or a mapping of tensors")


def rebuild(flat: list[Any], how: tuple[Any, ...]) -> Any:
    if how[0] == "tensor":
        return flat[0]
    if how[0] == "tuple":
        return how[1](flat)
    return how[1](**dict(zip(how[2], flat)))


def flat_module(module: Any, layout: tuple[Any, ...]) -> Any:
    """``module`` as a function of its argument tensors only, returning a flat tuple (what the exporters see)."""
    import torch

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *xs: Any) -> tuple[Any, ...]:
            return tuple(flatten(self.inner(*assemble(layout, xs)))[0])

    return Flat().eval()


def onnx_graph(module: Any, args: tuple[Any, ...]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import onnxruntime as ort
    import torch

    layout = layout_of(args)
    xs, axes = leaves(args)
    names = [f"in{i}" for i in range(len(xs))]
    dyn: dict[str, dict[int, str]] = {
        n: {0: "batch", **{ax: f"{n}_{ax}" for ax in ax_}} for n, x, ax_ in zip(names, xs, axes) if x.dim()}
    with torch.no_grad():
        flat = flat_module(module, layout)(*xs)
    outs = [f"out{i}" for i in range(len(flat))]
    dyn.update({o: {ax: f"{o}_{ax}" for ax in range(t.dim())} for o, t in zip(outs, flat)})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(flat_module(module, layout), tuple(xs), buf, dynamo=False, input_names=names, output_names=outs,
                          dynamic_axes=dyn, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads(), 1
    opts.log_severity_level = 4  # failures come back as exceptions (logged here in one line), not stderr
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}  # an argument the graph ignores is dropped by the exporter
    return lambda a: sess.run(None, {n: v for n, v in zip(names, a) if n in used})


def torchscript_graph(module: Any, args: tuple[Any, ...]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import torch

    xs = tuple(leaves(args)[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ts = torch.jit.freeze(torch.jit.trace(flat_module(module, layout_of(args)), xs, check_trace=False))

    def run(a: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [o.numpy() for o in ts(*[torch.from_numpy(v) for v in a])]
    return run


def one_line(exc: BaseException, n: int = 200) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:n]


def halved(xs: Sequence[Any], axes: Sequence[tuple[int, ...]]) -> list[Any]:
    """The example tensors cut to half their length on every dynamic axis (a second size to check)."""
    out = []
    for a, ax_ in zip(xs, axes):
        for ax in ax_:
            a = a.narrow(ax, 0, max(1, a.shape[ax] // 2))
        out.append(a)
    return out


def randomised(xs: Sequence[Any], seed: int) -> list[Any]:
    """The example tensors with each floating-point one replaced by uniform noise of its shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.rand(a.shape, generator=g, dtype=a.dtype) if a.is_floating_point() else a for a in xs]


def batched(xs: Sequence[Any], b: int, seed: int) -> list[Any]:
    """The example tensors at batch ``b``: those that share the first one's batch axis are
    repeated, floats randomised."""
    b0 = xs[0].shape[0]
    return randomised([a[:1].repeat(b, *([1] * (a.dim() - 1))) if a.dim() and a.shape[0] == b0 else a
                       for a in xs], seed)
