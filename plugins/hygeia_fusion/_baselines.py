"""The baselines the co-attention fusion is measured against, shipped in the fusion bundle.

- **text-only** (:class:`TextOnlyNet`): the fusion's own text path alone: projected token states
  of the frozen encoder, one learned query per finding attending over them, a linear read-out.
- **late fusion** (:class:`LateFusionNet`): concatenated pooled features. The image side is the
  image-only diagnoser's backbone, frozen (average+max pooled last stage, :class:`PooledImage`);
  the text side is the per-finding attention pooling above; an MLP per finding reads both.

The image-only baseline (the same backbone without text) is the image-only diagnoser itself,
which the lab takes from the registry. The trainer (:func:`hygeia_fusion.train.train`) fits both
heads on the fusion's training split after the fusion network, and stores their tensors in the
fusion bundle under ``baselines.``; :class:`BaselineDiagnoser` serves them for evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hygeia.api import Diagnosis, Finding, ModelIdentity
from hygeia.validation import check_texts

from .model import TEXT_DIM, encode_texts

PREFIX = "baselines."


class PooledImage(nn.Module):
    """A MONAI ResNet (the image-only diagnoser's layout) up to its pooled last stage: ``[B, C]``."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], stem: int, mean: float, std: float) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.mean, self.std = float(mean), float(std)
        self.net = ResNet("basic", list(blocks), list(widths), spatial_dims=2, n_input_channels=1,
                          conv1_t_size=int(stem), conv1_t_stride=2, no_max_pool=False, feed_forward=False)
        self.net.avgpool = nn.Identity()  # pooled below (average + max, as the image-only diagnoser does)
        self.width = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.net
        x = b.maxpool(b.act(b.bn1(b.conv1((x - self.mean) / self.std))))
        f = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return 0.5 * (f.mean(dim=(2, 3)) + f.amax(dim=(2, 3)))


class TextPool(nn.Module):
    """Per-finding attention pooling of projected token states: ``[B, F, d]`` (a no-text token first)."""

    def __init__(self, n_findings: int, width: int, heads: int = 4, text_dim: int = TEXT_DIM) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width))
        self.null = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, n_findings, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = states.shape[0]
        t = torch.cat([self.null.expand(b, 1, -1), self.proj(states.float())], 1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=t.device), ~mask.bool()], 1)
        q = self.attn(self.queries.expand(b, -1, -1), t, t, key_padding_mask=pad, need_weights=False)[0]
        return self.norm(q)


class TextOnlyNet(nn.Module):
    """Text alone: ``logit_k = w_k . pool_k(text) + b_k``."""

    def __init__(self, n_findings: int, width: int = 64) -> None:
        super().__init__()
        self.pool = TextPool(n_findings, width)
        self.w = nn.Parameter(torch.zeros(n_findings, width))
        self.bias = nn.Parameter(torch.zeros(n_findings))

    def forward(self, feats: torch.Tensor | None, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.pool(states, mask) * self.w).sum(-1) + self.bias


class LateFusionNet(nn.Module):
    """Pooled image features (frozen) concatenated with each finding's pooled text: an MLP per finding."""

    def __init__(self, n_findings: int, image_dim: int, width: int = 64) -> None:
        super().__init__()
        self.pool = TextPool(n_findings, width)
        self.image = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, width))
        self.mlp = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))
        self.finding = nn.Parameter(torch.randn(1, n_findings, width) * 0.02)

    def forward(self, feats: torch.Tensor | None, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert feats is not None
        t = self.pool(states, mask)
        img = self.image(feats)[:, None, :] + self.finding
        return self.mlp(torch.cat([img, t], -1))[..., 0]


def build(config: dict[str, Any], n_findings: int) -> dict[str, nn.Module]:
    """The baseline modules a bundle's ``config["baselines"]`` describes (image backbone, heads)."""
    img = config["image"]
    image = PooledImage(img["blocks"], img["widths"], img["stem"], img["mean"], img["std"])
    return {"image": image, "text_only": TextOnlyNet(n_findings, int(config["width"])),
            "late_fusion": LateFusionNet(n_findings, image.width, int(config["width"]))}


class BaselineDiagnoser:
    """A baseline of a fusion bundle as a diagnoser (``diagnose(images, texts)``), for the lab's tables."""

    condition_kinds = frozenset({"text", "none"})

    def __init__(self, kind: str, modules: dict[str, nn.Module], thresholds: Sequence[float], owner: Any) -> None:
        self.kind, self.head, self.image = kind, modules[kind], modules["image"]
        self.thresholds = np.asarray(thresholds, np.float32)
        self.findings, self.input_size, self.device = owner.findings, owner.input_size, owner.device
        self.max_tokens, self._images = owner.max_tokens, owner._images
        self._codes = [owner.codes[k] for k in owner.findings]
        self.identity = ModelIdentity(f"{owner.identity.name}:{kind}", owner.identity.version, "diagnoser",
                                      owner.identity.weights_sha256)

    def predict(self, images: Any, texts: Sequence[str] | None) -> np.ndarray:
        a = self._images(images)
        tx = check_texts(texts, len(a), name="texts") or [""] * len(a)
        out = []
        with torch.inference_mode():
            for i in range(0, len(a), 64):
                x = torch.from_numpy(a[i:i + 64]).to(self.device)
                states, mask = encode_texts(tx[i:i + 64], self.max_tokens)
                feats = self.image(x) if self.kind == "late_fusion" else None
                out.append(torch.sigmoid(self.head(feats, states.to(self.device), mask.to(self.device))).cpu().numpy())
        return np.concatenate(out)

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool = False) -> list[Diagnosis]:
        probs = self.predict(images, texts)
        return [Diagnosis([Finding(label, self._codes[j], float(p[j]), float(self.thresholds[j]), None, None)
                           for j, label in enumerate(self.findings)], self.identity, self.input_size) for p in probs]
