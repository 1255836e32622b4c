"""Freezing the ``diffusion`` generator for serving without torch (:mod:`hygeia.frozen`).

``unet.onnx`` (noisy samples, int64 timesteps and class labels, one per row -> predicted noise),
``decoder.onnx`` in latent mode (unscaled latents -> images in [0, 1], as
:meth:`hygeia_diffusion.model.Space.decode`), ``text/`` (the sentence encoder free-text conditions
are matched with, :func:`hygeia.text.export_encoder`) and ``diffusion.json`` (labels, sampling
defaults, the scheduler's training config and ``alphas_cumprod``, which
:func:`hygeia_diffusion._sampling.schedule` turns into DDIM and DPM-Solver++ updates).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from hygeia.frozen import export_onnx
from hygeia.text import export_encoder

from .model import make_scheduler

RUNNER = "hygeia_diffusion._frozen:FrozenDiffusion"


class _Unet(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample.float()


class _Decoder(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)


def freeze(plugin: Any, folder: Path) -> str:
    """Write ``plugin``'s frozen files into ``folder``; returns :data:`RUNNER`."""
    from diffusers import UNet2DModel

    if not isinstance(plugin.unet, UNet2DModel):
        raise ValueError("the UNet is compiled (compile=True); freeze a plugin built without it")
    unet = copy.deepcopy(plugin.unet).float().cpu().to(memory_format=torch.contiguous_format)
    shape = plugin.sample_shape
    axes = {0: "batch"}
    export_onnx(_Unet(unet), (torch.zeros(2, *shape), torch.full((2,), 500), torch.zeros(2, dtype=torch.long)),
                folder / "unet.onnx", ["sample", "timestep", "class_labels"], ["eps"],
                {"sample": axes, "timestep": axes, "class_labels": axes, "eps": axes})
    space = plugin.space
    if space.mode == "latent":
        vae = copy.deepcopy(space.vae).float().cpu()
        export_onnx(_Decoder(vae), (torch.zeros(2, *shape),), folder / "decoder.onnx", ["latents"], ["images"],
                    {"latents": axes, "images": axes})
    (folder / "text").mkdir()
    text = export_encoder(folder / "text")
    scheduler = make_scheduler(plugin.scheduler_config, "ddim")
    (folder / "diffusion.json").write_text(json.dumps({
        "config": plugin.config, "defaults": plugin.defaults, "labels": list(plugin.labels),
        "scheduler": plugin.scheduler_config, "alphas_cumprod": scheduler.alphas_cumprod.tolist(),
        "sample_shape": list(shape), "text_pad_id": text["pad_id"]}, indent=1))
    return RUNNER
