"""The ``diffusion`` generator served from its frozen graphs: no torch, no diffusers.

:class:`FrozenDiffusion` loads what :mod:`hygeia_diffusion._freeze` wrote and samples as
:class:`~hygeia_diffusion.plugin.DiffusionGenerator` does: the same ``generate`` (checks,
conditions, guidance, provenance: :class:`~hygeia_diffusion._sampling.Sampling`), the same noise
(:class:`hygeia.noise.TorchGenerator` draws what the plugin's ``torch.Generator`` draws), the
samplers' updates in numpy (:func:`~hygeia_diffusion._sampling.schedule`), the UNet and the
latent decoder on ONNX Runtime.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hygeia.frozen import OnnxGraph, model_identity
from hygeia.noise import TorchGenerator
from hygeia.text import LazySentences

from ._sampling import NULL_CLASS, Sampling, schedule, step


class FrozenDiffusion(Sampling):
    """``generate(n, condition="effusion", seed=0, steps=25, ...)`` from a frozen folder."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg = json.loads((folder / "diffusion.json").read_text())
        self.config: dict[str, Any] = cfg["config"]
        self.defaults: dict[str, Any] = cfg["defaults"]
        self.labels = tuple(cfg["labels"])
        self.scheduler_config: dict[str, Any] = cfg["scheduler"]
        self.alphas_cumprod = np.asarray(cfg["alphas_cumprod"], np.float32)
        self.sample_shape = tuple(int(v) for v in cfg["sample_shape"])
        self.identity = model_identity(folder)  # recorded by hygeia.frozen.freeze
        self.text_vectors = LazySentences(folder / "text", cfg["text_pad_id"])
        self.unet = OnnxGraph(folder / "unet.onnx")
        self.decoder = OnnxGraph(folder / "decoder.onnx") if self.config["mode"] == "latent" else None
        self.scaling = float(self.config.get("latent_scaling", 1.0))
        self.patch = int(self.config.get("patch", 1))
        clip = bool(self.scheduler_config.get("clip_sample", False))
        self.clip = float(self.scheduler_config.get("clip_sample_range", 1.0)) if clip else None

    def _sample(self, n: int, seed: int, cls: int, base: int, steps: int, gs: float, sampler: str,
                batch_size: int, progress: Callable[[int, int], Any] | None) -> np.ndarray:
        """``float32 [n, 1, 64, 64]`` images, as :meth:`DiffusionGenerator._sample
        <hygeia_diffusion.plugin.DiffusionGenerator._sample>`."""
        noise = TorchGenerator(seed).randn(n, *self.sample_shape)
        timesteps, rules = schedule(sampler, self.scheduler_config, self.alphas_cumprod, steps)
        batches = math.ceil(n / batch_size)
        guided = gs != 1.0 and cls != NULL_CLASS
        out = []
        for bi in range(batches):
            x = noise[bi * batch_size:(bi + 1) * batch_size]
            labels = np.array([cls] * len(x) + ([base] * len(x) if guided else []), np.int64)
            x0 = None
            for i, t in enumerate(timesteps):
                inp = np.concatenate([x, x]) if guided else x
                eps = self.unet(sample=inp, timestep=np.full(len(inp), t, np.int64), class_labels=labels)[0]
                if guided:
                    cond, uncond = eps[:len(x)], eps[len(x):]
                    eps = uncond + np.float32(gs) * (cond - uncond)
                x, x0 = step(x, eps, rules[i], x0, self.clip if sampler == "ddim" else None)
                if callable(progress):
                    progress(bi * steps + i + 1, batches * steps)
            out.append(self._decode(x))
        return np.concatenate(out).astype(np.float32)

    def _decode(self, x: np.ndarray) -> np.ndarray:
        if self.decoder is not None:
            return self.decoder(latents=(x / np.float32(self.scaling)).astype(np.float32))[0]
        p = self.patch
        if p > 1:  # pixel_shuffle
            b, c, h, w = x.shape
            x = x.reshape(b, c // (p * p), p, p, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)
        return np.clip((x + 1) / 2, 0, 1)
