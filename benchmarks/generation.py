"""Sampling throughput (images/s on CPU) of every registered image generator, and side-by-side
comparisons with reference implementations where one exists.

    python benchmarks/generation.py                      # every image generator, 256 images each
    python benchmarks/generation.py --only gan --n 1024  # one generator
    python benchmarks/generation.py --n-for diffusion=16 # fewer images for a slow sampler
    python benchmarks/generation.py --json               # machine-readable

The generator list comes from the plugin registry (``hygeia.get_registry()``), so a third-party
image generator is benchmarked too. Per-generator sampling options (e.g. a step count) go in
``GENERATE_OPTIONS``; a comparison against a reference (e.g. Hygeia's diffusion sampler vs the
vanilla diffusers pipeline with the same UNet, scheduler and steps) is a function registered with
``@comparison("NAME")`` that returns ``{"hygeia": x, "reference": y, "unit": ..., "ratio": x / y,
"target": t, ...}``: both sides measured in this run, on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch

GENERATE_OPTIONS: dict[str, dict[str, Any]] = {}
"""Extra ``generate()`` options per generator name for the throughput run."""

SAMPLE_COUNTS: dict[str, int] = {}
"""Images per generator where ``--n`` would take too long (a slow sampler); ``--n-for`` overrides."""

COMPARISONS: dict[str, Callable[[Any, argparse.Namespace], dict[str, Any]]] = {}
"""``name -> fn(generator, args) -> result``: comparisons against a reference implementation."""


def comparison(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register ``fn(generator, args)`` as the reference comparison of generator ``name``."""
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        COMPARISONS[name] = fn
        return fn
    return deco


def build(spec: Any) -> Any:
    """The plugin on CPU (``device="cpu"`` when its factory takes it)."""
    try:
        return spec.factory(device="cpu")
    except TypeError:
        return spec.factory()


def default_condition(gen: Any) -> Any:
    kinds = getattr(gen, "condition_kinds", frozenset())
    if "label" in kinds:
        return "effusion"
    if "text" in kinds:
        return "chest radiograph with a pleural effusion"
    return None


def throughput(gen: Any, n: int, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Images per second of ``gen.generate(n, ...)`` after a small warm-up call."""
    cond = default_condition(gen)
    print(f"[generation] {gen.identity.name}: sampling {n} images", file=sys.stderr, flush=True)
    gen.generate(min(n, 8), condition=cond, seed=seed + 1, **options)  # warm-up
    t = time.perf_counter()
    out = gen.generate(n, condition=cond, seed=seed, **options)
    dt = time.perf_counter() - t
    assert len(out) == n
    return {"n": n, "seconds": round(dt, 4), "images_per_s": round(n / dt, 2), "condition": cond,
            "options": options, "threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hygeia.plugins import get_registry

    reg = get_registry()
    results: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "generators": {}, "comparisons": {}}
    for spec in sorted(reg.all(), key=lambda s: s.name):
        if spec.kind != "generator" or (args.only and spec.name not in args.only):
            continue
        print(f"[generation] {spec.name}: loading", file=sys.stderr, flush=True)
        gen = build(spec)
        if getattr(gen, "output", None) != "image":
            continue
        n = args.n_for.get(spec.name, SAMPLE_COUNTS.get(spec.name, args.n))
        results["generators"][spec.name] = throughput(gen, n, seed=args.seed, **GENERATE_OPTIONS.get(spec.name, {}))
        if spec.name in COMPARISONS and not args.no_compare:
            print(f"[generation] {spec.name}: reference comparison", file=sys.stderr, flush=True)
            results["comparisons"][spec.name] = COMPARISONS[spec.name](gen, args)
    return results


@comparison("diffusion")
def _diffusion_vs_vanilla(gen: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Hygeia's diffusion sampler vs the vanilla diffusers loop (benchmarks/generation_diffusion.py)."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generation_diffusion import compare

    return compare(gen, args)


def _guided_vs_unguided(gen: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput with the bundle's default guidance against ``guidance_scale=1`` (the same
    network and noise), interleaved best of 3: what the guidance costs at sampling time."""
    n = args.n_for.get(gen.identity.name, args.n)
    best = {"guided": 0.0, "unguided": 0.0}
    for _ in range(3):
        for side, opts in (("guided", {}), ("unguided", {"guidance_scale": 1.0})):
            best[side] = max(best[side], throughput(gen, n, seed=args.seed, **opts)["images_per_s"])
    return {"hygeia": best["guided"], "reference": best["unguided"], "unit": "images/s",
            "ratio": best["guided"] / best["unguided"], "target": GUIDANCE_TARGETS[gen.identity.name],
            "what": f"default guidance {getattr(gen, 'defaults', {})} vs guidance_scale=1"}


GUIDANCE_TARGETS = {"gan": 0.95, "vae": 0.85}
"""gan: guidance shifts the condition vectors once per call (free); vae: each
sample goes through the guiding flow forward and back, about a tenth of the decoder's work."""
for _name in GUIDANCE_TARGETS:
    comparison(_name)(_guided_vs_unguided)


def render(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"image generation throughput on CPU ({results['threads']} threads)")
    for col in ("generator", "n", "seconds", "images/s", "condition", "options"):
        t.add_column(col, justify="right" if col in ("n", "seconds", "images/s") else "left")
    for name, r in results["generators"].items():
        t.add_row(name, str(r["n"]), f"{r['seconds']:.3f}", f"{r['images_per_s']:.1f}", str(r["condition"]),
                  json.dumps(r["options"]))
    console.print(t)
    if results["comparisons"]:
        c = Table(title="side-by-side comparisons (both sides measured in this run)")
        for col in ("generator", "hygeia", "reference", "unit", "ratio", "target", "met"):
            c.add_column(col)
        for name, r in results["comparisons"].items():
            c.add_row(name, f"{r['hygeia']:.3f}", f"{r['reference']:.3f}", str(r.get("unit", "")),
                      f"{r['ratio']:.3f}", f">= {r['target']}", "yes" if r["ratio"] >= r["target"] else "NO")
        console.print(c)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="images per generator (default 256)")
    p.add_argument("--n-for", action="append", default=[], metavar="NAME=N",
                   help="images for one generator (repeatable), e.g. --n-for diffusion=16")
    p.add_argument("--only", nargs="*", default=None, help="generator names to benchmark (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip the reference comparisons")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n: expected a positive integer")
    n_for: dict[str, int] = {}
    for item in args.n_for:
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            p.error(f"--n-for: expected NAME=N with N a positive integer, got {item!r}")
        n_for[name] = int(value)
    args.n_for = n_for
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        render(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
