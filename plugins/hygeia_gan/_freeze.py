"""Freezing the ``gan`` generator for serving without torch (:mod:`hygeia.frozen`).

``generator.onnx`` (noise ``[B, z_dim]`` and one ``cond_<conditioner>`` input ``[B, D]`` per
conditioner -> images in [0, 1]), ``conditioners/<name>/`` (each conditioner the bundle was
trained with, frozen by :func:`hygeia.frozen.freeze` and checked against it) and ``gan.json``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from hygeia.frozen import export_onnx
from hygeia.frozen import freeze as freeze_plugin

RUNNER = "hygeia_gan._frozen:FrozenGan"


class _Net(torch.nn.Module):
    def __init__(self, net: Any, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, z: torch.Tensor, *conds: torch.Tensor) -> torch.Tensor:
        return self.net(z, dict(zip(self.names, conds))).float().clamp(0, 1)


def freeze(plugin: Any, folder: Path) -> str:
    """Write ``plugin``'s frozen files into ``folder``; returns :data:`RUNNER`."""
    names = list(plugin.conditioners)
    net = copy.deepcopy(plugin.net).float().cpu().eval()
    example = (torch.randn(2, plugin.z_dim), *(torch.zeros(2, int(plugin.conditioners[k]["dim"])) for k in names))
    axes = {0: "batch"}
    inputs = ["z", *(f"cond_{k}" for k in names)]
    export_onnx(_Net(net, names), example, folder / "generator.onnx", inputs, ["images"],
                {**{k: axes for k in inputs}, "images": axes})
    for k in names:
        try:
            freeze_plugin(plugin._conditioner(k), folder / "conditioners" / k)
        except ValueError as exc:
            raise ValueError(f"conditioner {k!r}: {exc}") from None
    (folder / "gan.json").write_text(json.dumps({
        "config": plugin.config, "defaults": plugin.defaults, "z_dim": plugin.z_dim}, indent=1))
    return RUNNER
