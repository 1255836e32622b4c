"""The ``gan`` generator served from its frozen graph: no torch.

:class:`FrozenGan` loads what :mod:`hygeia_gan._freeze` wrote and samples as
:class:`~hygeia_gan.plugin.GanGenerator` does: the same ``generate``, guidance and noise
(:class:`~hygeia_gan._sampling.Sampling`), the network on ONNX Runtime, and each conditioner's own
frozen runner (:func:`hygeia.frozen.load`), loaded when a condition first needs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.frozen import OnnxGraph, load, model_identity

from ._sampling import Sampling, routes


class FrozenGan(Sampling):
    """``generate(n, condition="effusion", seed=0, ...)`` from a frozen folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg = json.loads((self.folder / "gan.json").read_text())
        self.config: dict[str, Any] = cfg["config"]
        self.conditioners = self.config["conditioners"]
        self.route = routes(self.conditioners)
        self.condition_kinds = frozenset({"none", *self.route})
        self.defaults: dict[str, Any] = cfg["defaults"]
        self.z_dim = int(cfg["z_dim"])
        self.identity = model_identity(self.folder)  # recorded by hygeia.frozen.freeze
        self.net = OnnxGraph(self.folder / "generator.onnx")
        self._runners: dict[str, Any] = {}

    def _encode(self, cname: str, value: str) -> np.ndarray:
        if cname not in self._runners:
            self._runners[cname] = load(self.folder / "conditioners" / cname)
        return np.asarray(self._runners[cname].encode([value]), np.float32)

    def _images(self, z: np.ndarray, conds: dict[str, np.ndarray]) -> np.ndarray:
        n = len(z)
        return self.net(z=np.ascontiguousarray(z, np.float32),
                        **{f"cond_{k}": np.repeat(v, n, 0) for k, v in conds.items()})[0]
