"""The conditioners' tensor code: the label table, the property encoding, the text encoder pieces.

- :func:`build_table`: the ``label`` embedding table, one orthonormal row per label of
  :data:`hygeia.vocab.CONDITION_LABELS`, drawn from a seed (the same table on every machine up to
  floating-point rounding of the QR decomposition).
- :func:`canonical_targets`, :func:`property_vector`, :func:`standardise`: the ``property``
  encoding (four standardised targets and four presence flags), with the MOSES statistics.
- :func:`token_states`, :func:`scatter_pooled`, :func:`scatter_tokens`: the ``text`` encoder run
  on the non-empty texts and the null rows filled in around it.

Pure functions of their arguments; no plugin, no bundle, no trainer here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from hygeia.vocab import CONDITION_LABELS

# ----------------------------------------------------------------------------- label
LABEL_DIM = 32


def build_table(seed: int = 0, dim: int = LABEL_DIM) -> torch.Tensor:
    """``float32 [len(CONDITION_LABELS), dim]``, orthonormal rows (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, len(CONDITION_LABELS), generator=g))
    return q.T.contiguous().float()  # [6, dim], orthonormal rows


# ----------------------------------------------------------------------------- property
# the encoding itself has no torch (the frozen runner shares it): hygeia_conditioners._properties
from ._properties import (  # noqa: F401  (part of this module's API)
    ALIASES,
    MEAN,
    PROPERTIES,
    PROPERTY_DIM,
    RANGES,
    STD,
    canonical_targets,
    property_vector,
)


def standardise(values: Sequence[Sequence[float]]) -> torch.Tensor:
    """Measured properties ``[B, 4]`` (logP, QED, SA, MW) -> standardised ``[B, 4]``."""
    v = torch.as_tensor(values, dtype=torch.float32)
    mean = torch.tensor([MEAN[p] for p in PROPERTIES])
    std = torch.tensor([STD[p] for p in PROPERTIES])
    return (v - mean) / std


# ----------------------------------------------------------------------------- text
TEXT_DIM = 384


def token_states(model: Any, tokens: Any) -> torch.Tensor:
    """The encoder's last hidden states ``float32 [B, T, 384]`` for tokenised texts."""
    with torch.inference_mode():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden.float()


def scatter_pooled(n: int, rows: list[int], vectors: torch.Tensor | None) -> torch.Tensor:
    """``[n, 384]``: ``vectors`` at ``rows``, zeros (the null condition) elsewhere."""
    out = torch.zeros(n, TEXT_DIM)
    if rows:
        out[torch.tensor(rows)] = vectors
    return out


def scatter_tokens(n: int, rows: list[int], hidden: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [n, T, 384], masks int64 [n, T])``: masked ``hidden`` at ``rows``; every other
    row is the null condition, one zero token with mask 1 at position 0."""
    t = max(int(hidden.shape[1]), 1)
    states = torch.zeros(n, t, TEXT_DIM)
    masks = torch.zeros(n, t, dtype=torch.long)
    masks[:, 0] = 1  # null rows: one zero token
    if rows:
        idx = torch.tensor(rows)
        states[idx] = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        masks[idx] = mask.long()
    return states, masks
