"""Frozen generators against their plugins, side by side in one run (CPU, one thread).

    .venv/bin/python benchmarks/frozen_generators.py                   # diffusion, vae, gan; ~3 minutes
    .venv/bin/python benchmarks/frozen_generators.py --only vae --rounds 5 --json out.json

For each image generator that can freeze itself (:mod:`hygeia.frozen`):

- **start**: the CPU seconds a fresh process spends to be ready to sample, as a Triton stub is:
  building the plugin and compiling its network (:func:`hygeia.compiled.compile_plugin`, ONNX),
  against loading the frozen runner; both include the imports and one first call;
- **sampling**: images per second of ``generate(n, "effusion", seed)`` with the bundle's defaults,
  three ways measured in alternating rounds (median): the eager plugin, the plugin with its
  network compiled to ONNX Runtime (what a stub served before freezing) and the frozen runner;
- **parity**: the largest pixel difference between the runner and the eager plugin on those images.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HYGEIA_COMPILED_THREADS", "1")

N_DEFAULT = {"diffusion": 8, "vae": 256, "gan": 256}

_START = {
    "plugin": ("import time, sys; from hygeia.plugins import get_registry; from hygeia.compiled import compile_plugin; "
               "g = get_registry().create('generator', sys.argv[1], device='cpu'); compile_plugin(g, 'onnx'); "
               "g.generate(1, 'effusion', seed=0, **{opts}); print(time.process_time())"),
    "frozen": ("import time, sys; from hygeia import frozen; r = frozen.load(sys.argv[2]); "
               "r.generate(1, 'effusion', seed=0, **{opts}); print(time.process_time())"),
}


def start_cpu(way: str, name: str, folder: Path, opts: dict) -> float:
    """CPU seconds of a fresh process that builds ``way`` and samples one image."""
    code = _START[way].format(opts=repr(opts))
    out = subprocess.run([sys.executable, "-c", code, name, str(folder)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{way} start of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.split()[-1])


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench(name: str, n: int, rounds: int) -> dict:
    import numpy as np
    import torch

    from hygeia.compiled import compile_plugin
    from hygeia.frozen import freeze, load
    from hygeia.plugins import get_registry

    torch.set_num_threads(1)
    plugin = get_registry().create("generator", name, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix=f"frozen-{name}-")) / "frozen"
    freeze(plugin, folder)
    runner = load(folder)
    quick = {"steps": 1} if name == "diffusion" else {}
    out = {"name": name, "n": n, "start_cpu_s": {w: start_cpu(w, name, folder, quick) for w in _START}}
    want = plugin.generate(n, "effusion", seed=1)
    got = runner.generate(n, "effusion", seed=1)
    out["max_pixel_diff"] = max(float(np.abs(g.pixels - w.pixels).max()) for g, w in zip(got, want))
    compiled = get_registry().create("generator", name, device="cpu")
    out["compiled_runtime"] = compile_plugin(compiled, "onnx").runtime
    ways = {"eager": plugin, "compiled": compiled, "frozen": runner}
    rates: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for way, obj in ways.items():
            obj.generate(1, "effusion", seed=0)
            rates[way].append(rate(lambda obj=obj: obj.generate(n, "effusion", seed=1), n))
    out["images_per_s"] = {k: statistics.median(v) for k, v in rates.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=list(N_DEFAULT), help="generators (default: diffusion vae gan)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    results = [bench(name, N_DEFAULT.get(name, 64), args.rounds) for name in args.only]
    table = Table(title="frozen generators, one thread: start (CPU s) and sampling (images/s)")
    for col in ("generator", "start: plugin", "start: frozen", "eager", "compiled", "frozen",
                "frozen / compiled", "max |pixel diff|"):
        table.add_column(col)
    for r in results:
        s, ips = r["start_cpu_s"], r["images_per_s"]
        table.add_row(f"{r['name']} (n={r['n']})", f"{s['plugin']:.2f}", f"{s['frozen']:.2f}", f"{ips['eager']:.1f}",
                      f"{ips['compiled']:.1f}", f"{ips['frozen']:.1f}", f"{ips['frozen'] / ips['compiled']:.2f}",
                      f"{r['max_pixel_diff']:.1e}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
