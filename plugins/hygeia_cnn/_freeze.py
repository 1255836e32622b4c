"""Freezing the ``cnn`` / ``cxr`` diagnosers for serving without torch (:mod:`hygeia.frozen`).

Two ONNX graphs: ``features.onnx`` (images -> probabilities and the ``cam_layer`` activations, one
pass, as :meth:`~hygeia_cnn.model.CnnNet.features`) and ``cams.onnx`` (activations of one image
and a one-hot class per row -> that class's heat map, as
:meth:`~hygeia_cnn.plugin.CnnDiagnoser.gradcam`). Grad-CAM needs the gradient of the class logit
with respect to the activations, and exported graphs have no autograd, so :class:`_Cams` writes
that gradient out for the network's tail (MONAI ``ResNet`` basic blocks, the ``avgmax`` or
average pooling, the linear head): transposed convolutions for the convolutions, the batch
norms' scales, the ReLUs' masks, the pooling's share per pixel. ``freeze`` refuses an
architecture it does not cover (the plugin is then served unfrozen); the parity check of
:func:`hygeia.frozen.freeze` compares the maps with autograd's.
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

from .model import STAGES, AvgMaxPool, _minmax

RUNNER = "hygeia_cnn._frozen:FrozenCnn"


def _scale(bn: nn.Module) -> torch.Tensor:
    """d(batch norm in eval mode)/d(input), per channel, shaped to broadcast over [B, C, H, W]."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)


def _conv_t(g: torch.Tensor, conv: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv``'s input (shaped as ``like``) from its output's gradient ``g``."""
    s, p, k = conv.stride[0], conv.padding[0], conv.kernel_size[0]
    op = like.shape[-1] - ((g.shape[-1] - 1) * s - 2 * p + k)
    return F.conv_transpose2d(g, conv.weight, stride=s, padding=p, output_padding=op)


class _Features(nn.Module):
    def __init__(self, net: nn.Module, stage: str) -> None:
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, acti = self.net.features(images, self.stage)
        return torch.sigmoid(logits), acti


class _Cams(nn.Module):
    """Heat maps ``[P, H, W]`` for rows of activations ``[P, C, h, w]`` and one-hot classes ``[P, F]``."""

    def __init__(self, net: nn.Module, stage: str, hires: bool, size: tuple[int, int]) -> None:
        super().__init__()
        n = net.net
        self.blocks = [b for name in STAGES[STAGES.index(stage) + 1:] for b in getattr(n, name.removeprefix("net."))]
        self.avgmax, self.fc, self.hires, self.size = isinstance(n.avgpool, AvgMaxPool), n.fc, hires, size
        self.net = net

    def grad(self, a: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        saved, h = [], a
        for blk in self.blocks:  # the tail's forward pass, keeping what its gradient needs
            o1 = blk.bn1(blk.conv1(h))
            pre = blk.bn2(blk.conv2(torch.relu(o1))) + (blk.downsample(h) if blk.downsample is not None else h)
            saved.append((blk, h, o1, pre))
            h = torch.relu(pre)
        g_pool = (onehot @ self.fc.weight).view(h.shape[0], -1, 1, 1)
        hw = h.shape[2] * h.shape[3]
        if self.avgmax:
            top = (h == h.amax(dim=(2, 3), keepdim=True)).to(h.dtype)
            g = 0.5 * g_pool / hw + 0.5 * g_pool * top / top.sum(dim=(2, 3), keepdim=True)
        else:
            g = g_pool.expand_as(h) / hw
        for blk, x, o1, pre in reversed(saved):
            g = g * (pre > 0).to(g.dtype)
            gx = _conv_t(g * _scale(blk.bn2), blk.conv2, o1) * (o1 > 0).to(g.dtype)
            gx = _conv_t(gx * _scale(blk.bn1), blk.conv1, x)
            if blk.downsample is not None:
                conv, bn = blk.downsample[0], blk.downsample[1]
                g = gx + _conv_t(g * _scale(bn), conv, x)
            else:
                g = gx + g
        return g

    def forward(self, acti: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        g = self.grad(acti, onehot)
        weight = g if self.hires else g.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weight * acti).sum(1, keepdim=True))
        cam = _minmax(F.interpolate(cam, size=self.size, mode="bilinear", align_corners=False))
        return torch.nan_to_num(cam[:, 0]).clamp(0, 1)


def _covered(net: nn.Module) -> str:
    """Why :class:`_Cams` cannot write out this network's gradient ('' when it can)."""
    n = net.net
    if not isinstance(n.avgpool, (AvgMaxPool, nn.AdaptiveAvgPool2d)) or n.fc is None:
        return "its pooling or head is not the ResNet's average (or avgmax) pooling and linear layer"
    for name in STAGES:
        for blk in getattr(n, name.removeprefix("net.")):
            if type(blk).__name__ != "ResNetBlock" or not isinstance(blk.act, nn.ReLU):
                return f"{name} has {type(blk).__name__} blocks (only basic blocks with ReLU are written out)"
            if blk.downsample is not None and not isinstance(blk.downsample, nn.Sequential):
                return "a shortcut is not a 1x1 convolution and batch norm"
    return ""


def freeze(plugin: Any, folder: Path) -> str:
    """Write ``plugin``'s frozen files into ``folder``; returns the runner's import path."""
    net = copy.deepcopy(plugin.net).cpu().eval()  # the plugin itself stays on its device
    why = _covered(net)
    if why:
        raise ValueError(f"cannot write out the heat maps' gradient: {why}")
    stage, (h, w) = plugin.arch["cam_layer"], plugin.input_size
    x = torch.rand(2, 1, h, w)
    export_onnx(_Features(net, stage), (x,), folder / "features.onnx", ["images"], ["probabilities", "activations"],
                {"images": {0: "batch"}, "probabilities": {0: "batch"}, "activations": {0: "batch"}})
    with torch.no_grad():
        acti = net.features(x, stage)[1]
    onehot = torch.eye(len(plugin.findings))[[0, 1]]
    cams = _Cams(net, stage, plugin.arch.get("cam", "gradcam") == "hirescam", (h, w))
    export_onnx(cams, (acti, onehot), folder / "cams.onnx", ["activations", "classes"], ["heatmaps"],
                {"activations": {0: "rows"}, "classes": {0: "rows"}, "heatmaps": {0: "rows"}})
    (folder / "cnn.json").write_text(json.dumps({
        "config": plugin.config, "findings": list(plugin.findings), "input_size": [h, w],
        "thresholds": plugin.thresholds.tolist(), "heatmaps": plugin.heatmaps, "batch_size": plugin.batch_size},
        indent=1))
    return RUNNER
