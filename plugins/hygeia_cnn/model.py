"""The ``cnn`` network: intensity normalisation + a MONAI ``ResNet`` (2-D, 1 channel in, F logits out).

:data:`DEFAULT_ARCH` is the network config a bundle's ``config["arch"]`` overrides (the 64 px phantom
model, widths 16-128); :data:`ARCH_256` is ResNet-18 (widths 64-512) with a stride-2 7x7 stem and
max pooling, for images of 128 px and more (the user-data trainer's default there, and ``cxr``).
:class:`CnnNet` builds either (MONAI is imported when a network is built). :func:`_minmax` is the
per-image min-max scaling of the Grad-CAM maps (also used by the tests against
``monai.visualize.GradCAM``).
"""
from __future__ import annotations

from typing import Any

import torch

from hygeia.vocab import FINDING_LABELS
from torch import nn

DEFAULT_ARCH: dict[str, Any] = {
    "network": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [2, 2, 2, 2],
    "block_inplanes": [16, 32, 64, 128],
    "conv1_t_size": 3,
    "conv1_t_stride": 1,
    "no_max_pool": True,
    "mean": 0.5,
    "std": 0.25,
    "cam_layer": "net.layer3",
    "pool": "avgmax",
}

ARCH_256: dict[str, Any] = {**DEFAULT_ARCH, "block_inplanes": [64, 128, 256, 512], "conv1_t_size": 7,
                             "conv1_t_stride": 2, "no_max_pool": False, "cam_layer": "net.layer2", "cam": "hirescam"}
"""For 256-512 px: ResNet-18 (11 M parameters, the standard widths 64-512); the stem downsamples 4x
(stride-2 7x7 conv + max pool) as ResNets do on ImageNet-sized images. Heat maps: HiResCAM on
``layer2`` (stride 8: 32x32 at 256 px), which located findings best on validation phantoms (see
docs/plugins/cnn.md)."""

STAGES = ("net.layer1", "net.layer2", "net.layer3", "net.layer4")
"""The ResNet stages a heat map can be taken on (``arch["cam_layer"]``)."""

CAM_METHODS = ("gradcam", "hirescam")
"""``arch["cam"]``: how heat maps weight the ``cam_layer`` activations (see ``CnnDiagnoser.gradcam``)."""


class AvgMaxPool(nn.Module):
    """Global pooling: the mean of average and max pooling (keeps a small, strong response)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x.mean(dim=(2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True))


class CnnNet(nn.Module):
    """Intensity normalisation + a MONAI ResNet (2-D, 1 -> ``n_out`` logits, one per finding)."""

    def __init__(self, arch: dict[str, Any], n_out: int = len(FINDING_LABELS)) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.mean, self.std = float(arch["mean"]), float(arch["std"])
        self.net = ResNet(block=arch["block"], layers=list(arch["layers"]), block_inplanes=list(arch["block_inplanes"]),
                          spatial_dims=2, n_input_channels=1, num_classes=int(n_out),
                          conv1_t_size=int(arch["conv1_t_size"]), conv1_t_stride=int(arch["conv1_t_stride"]),
                          no_max_pool=bool(arch["no_max_pool"]))
        if arch.get("pool", "avg") == "avgmax":  # small findings (nodules) survive global pooling
            self.net.avgpool = AvgMaxPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def features(self, x: torch.Tensor, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the output of ``stage`` (one of :data:`STAGES`), from one pass that computes
        what :meth:`forward` computes, in the same order (MONAI ``ResNet.forward``)."""
        n = self.net
        h = n.act(n.bn1(n.conv1((x - self.mean) / self.std)))
        if not n.no_max_pool:
            h = n.maxpool(h)
        for name in STAGES[:_stage(stage) + 1]:
            h = getattr(n, name.removeprefix("net."))(h)
        return self.tail(h, stage), h

    def tail(self, h: torch.Tensor, stage: str) -> torch.Tensor:
        """The logits from the output ``h`` of ``stage``: the later stages, pooling and the linear head."""
        n = self.net
        for name in STAGES[_stage(stage) + 1:]:
            h = getattr(n, name.removeprefix("net."))(h)
        h = n.avgpool(h).view(h.size(0), -1)
        return n.fc(h) if n.fc is not None else h


def _stage(stage: str) -> int:
    if stage not in STAGES:
        raise ValueError(f"cam_layer: expected one of {', '.join(STAGES)}, got {stage!r}")
    return STAGES.index(stage)


def _minmax(t: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``[B, 1, H, W]`` to [0, 1] (hottest = 1); an all-equal map becomes 0."""
    flat = t.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    return (t - lo) / (hi - lo).clamp_min(1e-12)
