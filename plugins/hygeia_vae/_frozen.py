"""The ``vae`` generator served from its frozen graphs: no torch, no diffusers, no FrEIA.

:class:`FrozenVae` loads what :mod:`hygeia_vae._freeze` wrote and samples as
:class:`~hygeia_vae.plugin.ImageVAE` does: the same ``generate`` and prior draws
(:class:`~hygeia_vae._sampling.Sampling`), the flow-paired guidance and the decoder on ONNX Runtime.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.frozen import OnnxGraph, model_identity
from hygeia.text import LazySentences

from ._sampling import Sampling


class FrozenVae(Sampling):
    """``generate(n, condition="effusion", seed=0, ...)`` from a frozen folder."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg = json.loads((folder / "vae.json").read_text())
        self.defaults: dict[str, Any] = cfg["defaults"]
        self.prior_kind = str(cfg["prior_kind"])
        self.latent_shape = tuple(int(v) for v in cfg["latent_shape"])  # type: ignore[assignment]
        with np.load(folder / "priors.npz") as f:
            arrays = {k: f[k] for k in f.files}
        self.embedding = arrays.pop("flow_embedding", None)
        self.prior_arrays = arrays
        self.has_flow = self.embedding is not None
        self.identity = model_identity(folder)  # recorded by hygeia.frozen.freeze
        self.text_vectors = LazySentences(folder / "text", cfg["text_pad_id"])
        self.decoder = OnnxGraph(folder / "decoder.onnx")
        self.guide = OnnxGraph(folder / "guide.onnx") if self.has_flow else None

    def _images(self, z: np.ndarray, row: int, base: int, scale: float) -> np.ndarray:
        z = np.ascontiguousarray(z, np.float32)
        if scale != 1.0 and self.guide is not None:
            e = self.embedding
            z = self.guide(z=z, e_row=np.repeat(e[row:row + 1], len(z), 0), e_base=np.repeat(e[base:base + 1], len(z), 0),
                           scale=np.array([scale], np.float32))[0]
        return self.decoder(latents=z)[0]
