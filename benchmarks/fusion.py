"""Throughput of the ``fusion`` diagnoser on CPU: diagnoses per second at batch 1 and the best batch.

Measured side by side in one run, on held-out phantoms with their clinical text, for:

- ``diagnose`` with text (text encoder + fusion net + heat maps + regions: what a user gets),
- ``diagnose`` image-only (texts=None),
- ``predict`` with text, no heat maps (probabilities only),

and the image-only ``cnn`` at the same batch sizes when it is installed. ``--compiled`` adds the
two ``diagnose`` cases with the network and the text encoder compiled (ONNX Runtime, what the
Triton model serves), measured in the same round-robin. Prints a table and the ratios
best-batch / batch-1. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion.py [--threads 1] [--seconds 3] [--repeats 3] [--compiled] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable


def _rate(fn: Callable[[], Any], batch: int, seconds: float) -> float:
    fn()  # warm up (and load the text encoder)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2 * batch:
            return n / dt


def _compiled_cases(reg: Any, cases: dict[str, Any], ps: Any) -> Callable[[bool], None]:
    """Add the compiled ``diagnose`` rows; returns a switch for the shared text encoder's compiled forward."""
    from hygeia.compiled import compile_plugin
    from hygeia.text import load_encoder

    fast = reg.create("diagnoser", "fusion", device="cpu")
    res = compile_plugin(fast, "onnx")
    if res.runtime != "onnx":
        raise SystemExit(f"fusion did not compile: {res.reason}")
    cases["fusion diagnose, text, compiled"] = lambda b: lambda: fast.diagnose(ps.images[:b], ps.texts[:b])
    cases["fusion diagnose, image-only, compiled"] = lambda b: lambda: fast.diagnose(ps.images[:b])
    enc = load_encoder()[1]
    fwd = enc.__dict__["forward"]

    def switch(on: bool) -> None:
        if on:
            enc.forward = fwd
        else:
            enc.__dict__.pop("forward", None)
    return switch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin repeats (median is reported)")
    ap.add_argument("--compiled", action="store_true", help="also the compiled network and text encoder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from hygeia_lab import make_phantom_set
    from hygeia.plugins import get_registry

    reg = get_registry()
    fusion = reg.create("diagnoser", "fusion", device="cpu")
    try:
        cnn = reg.create("diagnoser", "cnn", device="cpu")
    except Exception:  # noqa: BLE001 - optional comparison
        cnn = None
    batches = [int(b) for b in args.batches.split(",")]
    size = fusion.input_size[0]
    ps = make_phantom_set(max(batches), "test", size=size, start=5000)
    # the cnn baseline gets the same patients rendered at its own input size
    cnn_images = make_phantom_set(max(batches), "test", size=cnn.input_size[0], start=5000).images if cnn else None
    cases: dict[str, Callable[[int], Callable[[], Any]]] = {
        "fusion diagnose, text": lambda b: lambda: fusion.diagnose(ps.images[:b], ps.texts[:b]),
        "fusion diagnose, image-only": lambda b: lambda: fusion.diagnose(ps.images[:b]),
        "fusion predict, text, no maps": lambda b: lambda: fusion.predict(ps.images[:b], ps.texts[:b], maps=False),
    }
    if cnn is not None:
        cases["cnn diagnose (image-only baseline)"] = lambda b: lambda: cnn.diagnose(cnn_images[:b])
    encoder_on = _compiled_cases(reg, cases, ps) if args.compiled else None
    # round-robin repeats, median per cell: a shared machine's load shifts during a run
    runs: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in cases}
    for _ in range(args.repeats):
        for name, make in cases.items():
            if encoder_on is not None:  # the text encoder is shared: compiled only for the compiled rows
                encoder_on(name.endswith("compiled"))
            for b in batches:
                runs[name][b].append(_rate(make(b), b, args.seconds))
    results = {name: {b: float(np.median(v)) for b, v in r.items()} for name, r in runs.items()}
    summary = {
        name: {"batch_1": r[1] if 1 in r else None, "best_batch": max(r, key=r.get), "best": max(r.values()),
               "best_over_batch_1": (max(r.values()) / r[1]) if 1 in r else None, "by_batch": r}
        for name, r in results.items()
    }
    if args.json:
        print(json.dumps({"threads": args.threads, "device": "cpu", "fusion_input_size": size, "results": summary}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("case", *[f"batch {b}" for b in batches], "best / batch 1",
              title=f"fusion diagnoses/s on CPU ({args.threads} thread(s), fusion {size}x{size})")
    for name, r in results.items():
        s = summary[name]
        t.add_row(name, *[f"{r[b]:.1f}" for b in batches],
                  f"{s['best_over_batch_1']:.1f}x at {s['best_batch']}" if s["best_over_batch_1"] else "-")
    Console().print(t)
    if cnn is not None:
        a, c = summary["fusion diagnose, text"], summary["cnn diagnose (image-only baseline)"]
        Console().print(f"fusion (text) / cnn at batch 1: {a['batch_1'] / c['batch_1']:.2f}x; "
                        f"at best batch: {a['best'] / c['best']:.2f}x")


if __name__ == "__main__":
    main()
