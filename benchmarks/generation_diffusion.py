"""Diffusion sampling: Hygeia's sampler vs the vanilla diffusers loop, same UNet, scheduler and steps.

The vanilla side is the loop a diffusers pipeline runs for a class-conditional model with
classifier-free guidance (DiTPipeline's ``__call__``, with the UNet in place of the transformer,
since DDIMPipeline takes no class labels): ``@torch.no_grad``, float32, a tqdm progress bar,
label and null predictions batched, ``scheduler.step`` per step. The Hygeia side is the plugin's
``generate`` call end to end (input checks, sampling, decoding to [0, 1] images). Variants of
Hygeia's sampler (channels_last, bfloat16 autocast, torch.compile) are timed side by side so that
only what helps on the machine at hand is kept (the plugin's default: channels_last weights;
``compile=True`` in the factory for long-lived processes).

    python benchmarks/generation_diffusion.py [--n 16] [--steps 25] [--repeats 3] [--device cpu]

Prints one line per variant with its median time and ``ratio = vanilla / variant`` (> 1: faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch


def vanilla_sample(unet: Any, scheduler: Any, n: int, label: int, null: int, steps: int, guidance: float,
                   seed: int, device: torch.device) -> torch.Tensor:
    """The diffusers pipeline loop (as in DiTPipeline.__call__), with the same UNet and scheduler."""
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    with torch.no_grad():
        shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), device=device)
        latent_model_input = torch.cat([latents] * 2) if guidance > 1 else latents
        class_labels = torch.full((n,), label, device=device)
        class_null = torch.full((n,), null, device=device)
        class_labels_input = torch.cat([class_labels, class_null], 0) if guidance > 1 else class_labels
        scheduler.set_timesteps(steps)
        for t in tqdm(scheduler.timesteps, disable=True):
            if guidance > 1:
                half = latent_model_input[: len(latent_model_input) // 2]
                latent_model_input = torch.cat([half, half], dim=0)
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = unet(latent_model_input, t, class_labels=class_labels_input).sample
            if guidance > 1:
                cond_eps, uncond_eps = torch.split(noise_pred, len(noise_pred) // 2, dim=0)
                half_eps = uncond_eps + guidance * (cond_eps - uncond_eps)
                noise_pred = torch.cat([half_eps, half_eps], dim=0)
            latent_model_input = scheduler.step(noise_pred, t, latent_model_input).prev_sample
        return latent_model_input.chunk(2)[0] if guidance > 1 else latent_model_input


def _time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per function, timed round-robin (A B C A B C ...) so that a change in the
    machine's load (a shared CPU) hits every variant alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(n: int = 16, steps: int = 25, repeats: int = 3, device: str | None = None, guidance: float = 2.0,
        bundle: str | None = None, compile: bool = True) -> dict[str, Any]:
    import hygeia
    from hygeia_diffusion.model import NULL_CLASS, make_scheduler

    opts = {"device": device} if device else {}
    if bundle:
        opts["bundle"] = bundle
    gen = hygeia.create("generator", "diffusion", **opts)
    dev = gen.device
    label = "effusion"
    cls = gen.labels.index(label)
    # the vanilla loop's guidance baseline is the null class: the same here (the bundle's default guides
    # findings away from 'normal', which costs the same UNet passes but draws other images)
    run_hygeia = lambda g: g.generate(n, condition=label, seed=0, steps=steps, guidance_scale=guidance,  # noqa: E731
                                      batch_size=n, negative_condition="none")
    unet = gen.unet
    compiled = torch.compile(unet) if compile else None  # what DiffusionGenerator(compile=True) does

    def variant(fmt: torch.memory_format, dtype: torch.dtype | None = None, net: Any = None) -> Callable[[], Any]:
        def fn() -> Any:
            unet.to(memory_format=fmt)
            gen.unet, gen.dtype = net if net is not None else unet, dtype
            return run_hygeia(gen)
        return fn

    def vanilla() -> Any:
        unet.to(memory_format=torch.contiguous_format)  # as diffusers loads it
        return gen.space.decode(vanilla_sample(unet, make_scheduler(gen.scheduler_config, "ddim"), n, cls,
                                               NULL_CLASS, steps, guidance, 0, dev))

    fns: dict[str, Callable[[], Any]] = {
        "vanilla diffusers loop": vanilla,
        "hygeia generate (default)": variant(torch.channels_last),
        "hygeia, contiguous weights": variant(torch.contiguous_format),
        "hygeia + bf16 autocast": variant(torch.channels_last, torch.bfloat16),
    }
    if compiled is not None:
        fns["hygeia + torch.compile"] = variant(torch.channels_last, None, compiled)
    try:
        rows = _time_interleaved(fns, repeats, dev)
    finally:
        gen.unet, gen.dtype = unet.to(memory_format=torch.channels_last), None
    base = rows["vanilla diffusers loop"]
    result = {"device": str(dev), "threads": torch.get_num_threads(), "n": n, "steps": steps, "guidance": guidance,
              "seconds": {k: round(v, 4) for k, v in rows.items()},
              "ratio_vs_vanilla": {k: round(base / v, 3) for k, v in rows.items()}}
    return result


def compare(gen: Any, args: Any) -> dict[str, Any]:
    """The ``diffusion`` row of ``benchmarks/generation.py``: images/s, Hygeia vs vanilla (same run).

    The headline is Hygeia's fastest configuration, ``compile=True`` (torch.compile, after its
    one-time compilation); the default configuration's ratio is reported next to it.
    """
    n = min(int(getattr(args, "n", 16)), 64)
    r = run(n=n, steps=25, repeats=3, device=str(gen.device), compile=True)
    s = r["seconds"]
    best = "hygeia + torch.compile"
    return {"hygeia": n / s[best], "reference": n / s["vanilla diffusers loop"], "unit": "images/s",
            "ratio": s["vanilla diffusers loop"] / s[best], "target": 1.0, "hygeia_configuration": "compile=True",
            "reference_name": "vanilla diffusers CFG loop (DiTPipeline-style), same UNet/DDIM/25 steps",
            "variants": r["ratio_vs_vanilla"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = run(a.n, a.steps, a.repeats, a.device, bundle=a.bundle, compile=not a.no_compile)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"diffusion sampling, {r['n']} images x {r['steps']} DDIM steps, guidance {r['guidance']}, "
          f"device {r['device']}, {r['threads']} thread(s)")
    for k, s in r["seconds"].items():
        print(f"  {k:30s} {s:8.3f} s   ratio {r['ratio_vs_vanilla'][k]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
