"""Freezing the ``vae`` generator for serving without torch (:mod:`hygeia.frozen`).

``decoder.onnx`` (unscaled latents -> images in [0, 1], as :meth:`hygeia_vae.plugin.ImageVAE.decode`),
``guide.onnx`` when the bundle guides its prior through the flow (unscaled prior samples, the
condition's and the negative's flow embeddings, the scale -> guided unscaled latents, as
:meth:`~hygeia_vae.plugin.ImageVAE._flow_guided`), ``priors.npz`` (the label priors' arrays),
``text/`` (the sentence encoder free-text conditions are matched with) and ``vae.json``. A bundle
whose prior *is* the flow (``prior="flow"``) is not frozen.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia.frozen import export_onnx
from hygeia.text import export_encoder

RUNNER = "hygeia_vae._frozen:FrozenVae"


class _Decoder(torch.nn.Module):
    def __init__(self, autoencoder: Any) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.autoencoder.decode(latents).sample.float() + 1) / 2).clamp(0, 1)


class _Guide(torch.nn.Module):
    def __init__(self, flow: Any, scaling: float) -> None:
        super().__init__()
        self.flow, self.scaling = flow, scaling

    def forward(self, z: torch.Tensor, e_row: torch.Tensor, e_base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = z * self.scaling
        zb = self.flow.inverse(self.flow(x, e_row), e_base)
        return (zb + scale * (x - zb)) / self.scaling


def freeze(plugin: Any, folder: Path) -> str:
    """Write ``plugin``'s frozen files into ``folder``; returns :data:`RUNNER`."""
    if plugin.prior_kind == "flow":
        raise ValueError("a flow prior is sampled with torch (only mixture and Gaussian priors are frozen)")
    shape = tuple(plugin.latent_shape)
    axes = {0: "batch"}
    ae = copy.deepcopy(plugin.autoencoder).float().cpu()
    export_onnx(_Decoder(ae), (torch.zeros(2, *shape),), folder / "decoder.onnx", ["latents"], ["images"],
                {"latents": axes, "images": axes})
    embedding = None
    if plugin.flow is not None:
        flow = copy.deepcopy(plugin.flow).float().cpu()
        embedding = flow.embedding.weight.detach().numpy()
        e = torch.from_numpy(embedding[:2].copy())
        export_onnx(_Guide(flow, plugin.scaling_factor), (torch.randn(2, *shape), e, e.flip(0), torch.tensor([3.0])),
                    folder / "guide.onnx", ["z", "e_row", "e_base", "scale"], ["latents"],
                    {"z": axes, "e_row": axes, "e_base": axes, "latents": axes})
    np.savez(folder / "priors.npz", **plugin.prior_arrays, **({} if embedding is None else {"flow_embedding": embedding}))
    (folder / "text").mkdir()
    text = export_encoder(folder / "text")
    (folder / "vae.json").write_text(json.dumps({
        "defaults": plugin.defaults, "prior_kind": plugin.prior_kind, "latent_shape": list(shape),
        "text_pad_id": text["pad_id"]}, indent=1))
    return RUNNER
