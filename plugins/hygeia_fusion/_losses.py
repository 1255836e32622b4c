"""The fusion trainer's localisation losses beside the per-cell cross-entropy: per-finding weights
of the evidence maps (``mask_finding_weight``) and the pointing loss (``mask_point_weight``)."""
from __future__ import annotations

from typing import Any

import torch

from hygeia.errors import InputError
from hygeia.vocab import FINDING_LABELS


def pointing_loss(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log`` of the share of a softmax over each evidence map's cells that falls inside its
    finding's mask, averaged over the (image, finding) pairs with a mask; 0 without any.

    The cross-entropy per cell rewards a map that is high over the finding, wherever its maximum
    lands; this rewards the maximum landing on it, which is what a heat map's peak is used for."""
    inside = target.flatten(2) > 0  # [B, K, cells]
    has = inside.any(-1)
    if not bool(has.any()):
        return maps.sum() * 0.0
    logp = torch.log_softmax(maps.flatten(2).float(), -1)
    mass = torch.logsumexp(logp.masked_fill(~inside, -float("inf")), -1)  # log share inside the mask
    return -mass[has].mean()


def finding_weights(weights: Any) -> list[float]:
    """``mask_finding_weight`` ({finding: weight}, the others 1) as one weight per finding, in order."""
    if not isinstance(weights, dict) or set(weights) - set(FINDING_LABELS):
        raise InputError("option mask_finding_weight", f"a JSON object of {', '.join(FINDING_LABELS)} -> weight",
                         got=repr(weights))
    out = [weights.get(f, 1.0) for f in FINDING_LABELS]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e4 for v in out):
        raise InputError("option mask_finding_weight", "weights that are numbers from 0 to 10000", got=repr(weights))
    return [float(v) for v in out]
