"""Freezing the fusion diagnoser for serving without torch (:mod:`hygeia.frozen`).

Writes the graphs :class:`~hygeia_fusion._frozen.FrozenFusion` runs: the text encoder
(``encoder.onnx``: token ids and mask -> token states), the fusion network with text
(``fusion_text.onnx``: images, token states padded to ``max_tokens``, mask -> probabilities and
heat maps) and without (``fusion_image.onnx``), each ending in what
:meth:`~hygeia_fusion.plugin.FusionDiagnoser.predict` does after the network (sigmoid; maps
upsampled bilinearly and min-max scaled), the encoder's ``tokenizer.json`` and ``fusion.json``
(findings, thresholds, codes, sizes; the identity is in ``frozen.json``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hygeia.frozen import export_onnx
from hygeia.text import export_encoder

RUNNER = "hygeia_fusion._frozen:FrozenFusion"


class _Served(nn.Module):
    """The network plus predict()'s tail; calls the eager forward (a compiled graph installed on
    the network by :mod:`hygeia.compiled` is bypassed)."""

    def __init__(self, net: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, images: torch.Tensor, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = type(self.net).forward(self.net, images, states, mask)
        m = F.interpolate(out["maps"], size=self.size, mode="bilinear", align_corners=False)
        lo, hi = m.amin(dim=(2, 3), keepdim=True), m.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(out["logits"]), (m - lo) / (hi - lo).clamp(min=1e-6)


def freeze(plugin: Any, folder: Path) -> str:
    """Write ``plugin``'s frozen files into ``folder``; returns the runner's import path."""
    h, w = plugin.input_size
    served = _Served(copy.deepcopy(plugin.net).cpu().eval(), (h, w))  # the plugin itself stays on its device
    x = torch.rand(2, 1, h, w)
    out = ["probabilities", "heatmaps"]
    dyn = {"images": {0: "batch"}, "probabilities": {0: "batch"}, "heatmaps": {0: "batch"}}
    export_onnx(served, (x,), folder / "fusion_image.onnx", ["images"], out, dyn)
    cfg: dict[str, Any] = {"config": plugin.config, "input_size": [h, w], "findings": list(plugin.findings),
                           "thresholds": plugin.thresholds.tolist(), "thresholds_no_text": plugin.thresholds_no_text.tolist(),
                           "max_tokens": plugin.max_tokens, "regions": plugin.regions, "use_text": plugin.use_text,
                           "batch_size": plugin.batch_size}
    if plugin.use_text:
        dim = plugin.net.text_proj[0].in_features
        states, mask = torch.rand(2, plugin.max_tokens, dim), torch.ones(2, plugin.max_tokens, dtype=torch.long)
        mask[1, 12:] = 0
        export_onnx(served, (x, states, mask), folder / "fusion_text.onnx", ["images", "states", "mask"], out,
                    {**dyn, "states": {0: "batch"}, "mask": {0: "batch"}})
        cfg.update(export_encoder(folder))
    (folder / "fusion.json").write_text(json.dumps(cfg, indent=1))
    return RUNNER
