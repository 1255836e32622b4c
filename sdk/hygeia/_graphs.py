"""How :mod:`hygeia.compiled` turns a network into a graph: example arguments (:class:`Dynamic`
axes), flat outputs and their rebuilding, the ONNX Runtime and TorchScript exporters, and the
example variants the parity check and the timings use."""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

THREADS_ENV = "HYGEIA_COMPILED_THREADS"


@dataclass
class Dynamic:
    """An example argument whose ``axes`` (besides the batch axis 0) vary between calls."""

    tensor: Any
    axes: tuple[int, ...]


def unwrap(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[tuple[int, ...], ...]]:
    """The tensors (or None) of a way of calling, and each one's dynamic axes besides the batch."""
    return (tuple(a.tensor if isinstance(a, Dynamic) else a for a in args),
            tuple(tuple(a.axes) if isinstance(a, Dynamic) else () for a in args))


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


def flat_module(module: Any, present: tuple[bool, ...]) -> Any:
    """``module`` as a function of the present arguments only, returning a flat tuple (what the exporters see)."""
    import torch

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *xs: Any) -> tuple[Any, ...]:
            it = iter(xs)
            return tuple(flatten(self.inner(*[next(it) if p else None for p in present]))[0])

    return Flat().eval()


def onnx_graph(module: Any, args: tuple[Any, ...]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import onnxruntime as ort
    import torch

    args, axes = unwrap(args)
    present = tuple(a is not None for a in args)
    xs = tuple(a for a in args if a is not None)
    names = [f"in{i}" for i in range(len(xs))]
    dyn: dict[str, dict[int, str]] = {
        n: {0: "batch", **{ax: f"{n}_{ax}" for ax in ax_}} for n, x, ax_ in
        zip(names, xs, [ax for a, ax in zip(args, axes) if a is not None]) if x.dim()}
    with torch.no_grad():
        flat = flat_module(module, present)(*xs)
    outs = [f"out{i}" for i in range(len(flat))]
    dyn.update({o: {ax: f"{o}_{ax}" for ax in range(t.dim())} for o, t in zip(outs, flat)})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(flat_module(module, present), xs, buf, dynamo=False, input_names=names, output_names=outs,
                          dynamic_axes=dyn, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads(), 1
    opts.log_severity_level = 4  # failures come back as exceptions (logged here in one line), not stderr
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}  # an argument the graph ignores is dropped by the exporter
    return lambda a: sess.run(None, {n: v for n, v in zip(names, a) if n in used})


def torchscript_graph(module: Any, args: tuple[Any, ...]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import torch

    args = unwrap(args)[0]
    present = tuple(a is not None for a in args)
    xs = tuple(a for a in args if a is not None)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ts = torch.jit.freeze(torch.jit.trace(flat_module(module, present), xs, check_trace=False))

    def run(a: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [o.numpy() for o in ts(*[torch.from_numpy(v) for v in a])]
    return run


def one_line(exc: BaseException, n: int = 200) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:n]


def halved(args: tuple[Any, ...], axes: tuple[tuple[int, ...], ...]) -> tuple[Any, ...]:
    """The example cut to half its length on every dynamic axis (a second size to check)."""
    out = []
    for a, ax_ in zip(args, axes):
        for ax in ax_:
            a = a.narrow(ax, 0, max(1, a.shape[ax] // 2))
        out.append(a)
    return tuple(out)


def randomised(args: tuple[Any, ...], seed: int) -> tuple[Any, ...]:
    """The example with each floating-point tensor replaced by uniform noise of its shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(a.shape, generator=g, dtype=a.dtype) if a is not None and a.is_floating_point() else a
                 for a in args)


def batched(args: tuple[Any, ...], b: int, seed: int) -> tuple[Any, ...]:
    """The example at batch ``b``: arguments that share the first one's batch axis are repeated, floats randomised."""

    b0 = args[0].shape[0]
    grown = tuple(a[:1].repeat(b, *([1] * (a.dim() - 1))) if a is not None and a.dim() and a.shape[0] == b0 else a
                  for a in args)
    return randomised(grown, seed)
