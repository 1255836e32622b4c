"""Fitting the fusion's baselines (:mod:`hygeia_fusion._baselines`) after the fusion network.

Both heads train on the fusion's training split with the same frozen text token states; the late
fusion's image features come from the image-only diagnoser's backbone (the ``init`` bundle the
fusion was warm-started from), frozen and computed once. Each head keeps the epoch with the best
validation macro AUROC; thresholds are Youden's J on validation. Called by
:func:`hygeia_fusion.train.train`; imported only when training starts.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hygeia.bundles import load_bundle
from hygeia_lab.training import youden_thresholds

from ._baselines import PREFIX, build

EPOCHS, LR, BATCH = 15, 2e-3, 128


def image_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The frozen image backbone's layout: the fusion network's own (they share the init bundle)."""
    return {"blocks": list(arch["blocks"]), "widths": list(arch["widths"]), "stem": int(arch["stem"]),
            "mean": float(arch["mean"]), "std": float(arch["std"])}


def _backbone_tensors(init: str | None, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``net.*`` tensors for :class:`PooledImage`: the init bundle's (an image-only diagnoser's
    ``net.*``, or a fusion bundle's own baseline backbone, so a chain of runs keeps the image-only
    diagnoser's), else the trained fusion network's backbone."""
    if init:
        t = load_bundle(init).tensors
        pre = f"{PREFIX}image."
        if any(k.startswith(pre) for k in t):
            return {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}
        if any(k.startswith("net.") for k in t):
            return {k: v for k, v in t.items() if k.startswith("net.") and not k.startswith("net.fc.")}
    return {"net." + k[len("backbone."):]: v for k, v in fused.items() if k.startswith("backbone.")}


def _features(image: torch.nn.Module, images: np.ndarray, dev: torch.device) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            out.append(image(torch.from_numpy(np.asarray(images[i:i + 64], np.float32)).to(dev)).cpu())
    return torch.cat(out)


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.nanmean([roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]))


def _probs(head: torch.nn.Module, feats: torch.Tensor, text: tuple[torch.Tensor, ...], dev: torch.device) -> np.ndarray:
    s, m, idx = text
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(idx), 512):
            j = idx[i:i + 512]
            out.append(torch.sigmoid(head(feats[i:i + 512].to(dev), s[j].float().to(dev), m[j].to(dev))).cpu().numpy())
    return np.concatenate(out)


def _fit_head(head: torch.nn.Module, feats: tuple[torch.Tensor, torch.Tensor], y: tuple[np.ndarray, np.ndarray],
              text: dict[str, tuple[torch.Tensor, ...]], g: torch.Generator, dev: torch.device) -> tuple[float, np.ndarray]:
    """Train one head; it ends holding its best epoch. Returns that AUROC and its validation probabilities."""
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=1e-4)
    (s, m, idx), ytr = text["train"], torch.from_numpy(np.asarray(y[0], np.float32))
    best: tuple[float, Any, Any] = (-1.0, None, None)
    for _ in range(EPOCHS):
        head.train()
        perm = torch.randperm(len(idx), generator=g)
        for i in range(0, len(perm), BATCH):
            j = perm[i:i + BATCH]
            logits = head(feats[0][j].to(dev), s[idx[j]].float().to(dev), m[idx[j]].to(dev))
            loss = F.binary_cross_entropy_with_logits(logits, ytr[j].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        p = _probs(head, feats[1], text["val"], dev)
        auc = _macro_auroc(y[1], p)
        if auc > best[0]:
            best = (auc, copy.deepcopy(head.state_dict()), p)
    head.load_state_dict(best[1])
    return best[0], best[2]


def fit_baselines(arch: dict[str, Any], init: str | None, fused: dict[str, torch.Tensor],
                  images: tuple[np.ndarray, np.ndarray], labels: tuple[np.ndarray, np.ndarray],
                  text: dict[str, tuple[torch.Tensor, ...]], seed: int, dev: torch.device,
                  progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, float]]:
    """Train text-only and late fusion; returns their prefixed tensors, config and validation AUROCs."""
    width = int(arch["width"])
    config: dict[str, Any] = {"width": width, "image": image_config(arch)}
    mods = build(config, int(arch["n_findings"]))
    mods["image"].load_state_dict(_backbone_tensors(init, fused), strict=True)
    mods["image"].to(dev).eval()
    feats = (_features(mods["image"], images[0], dev), _features(mods["image"], images[1], dev))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    metrics, thresholds = {}, {}
    for kind in ("text_only", "late_fusion"):
        head = mods[kind].to(dev)
        auc, p = _fit_head(head, feats, labels, text, g, dev)
        metrics[f"val_macro_auroc_{kind}"] = round(auc, 4)
        thresholds[kind] = youden_thresholds(labels[1], p, np.ones_like(labels[1]))
        if progress:
            print(f"baseline {kind}: validation macro AUROC {auc:.4f}")
    config["thresholds"] = thresholds
    tensors = {f"{PREFIX}{name}.{k}": v.detach().cpu() for name, mod in mods.items() for k, v in mod.state_dict().items()}
    return tensors, config, metrics
