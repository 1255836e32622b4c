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

import math
from typing import Any, Mapping, Sequence

import torch

from hygeia.errors import InputError
from hygeia.vocab import CONDITION_LABELS

# ----------------------------------------------------------------------------- label
LABEL_DIM = 32


def build_table(seed: int = 0, dim: int = LABEL_DIM) -> torch.Tensor:
    """``float32 [len(CONDITION_LABELS), dim]``, orthonormal rows (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, len(CONDITION_LABELS), generator=g))
    return q.T.contiguous().float()  # [6, dim], orthonormal rows


# ----------------------------------------------------------------------------- property
PROPERTIES: tuple[str, ...] = ("logP", "QED", "SA", "MW")
PROPERTY_DIM = 2 * len(PROPERTIES)
# Mean and standard deviation over 3,000 random MOSES training molecules (RDKit Crippen logP,
# QED, Ertl SA score, average molecular weight in Da).
MEAN = {"logP": 2.450, "QED": 0.807, "SA": 2.460, "MW": 307.8}
STD = {"logP": 0.935, "QED": 0.0948, "SA": 0.460, "MW": 27.98}
# Accepted targets: the MOSES training range, slightly widened (MOSES keeps 250-350 Da).
RANGES = {"logP": (-3.0, 6.0), "QED": (0.0, 1.0), "SA": (1.0, 6.0), "MW": (240.0, 360.0)}
ALIASES = {"logp": "logP", "clogp": "logP", "qed": "QED", "sa": "SA", "sas": "SA", "mw": "MW",
           "weight": "MW", "molwt": "MW", "molecular_weight": "MW"}


def canonical_targets(condition: Mapping[str, Any], name: str = "condition") -> dict[str, float]:
    """Map alias keys to ``logP/QED/SA/MW`` and check every value is a number in range."""
    if not isinstance(condition, Mapping):
        raise InputError(name, "a dict of property targets such as {'logP': 2.5, 'QED': 0.8}",
                         got=type(condition).__name__)
    out: dict[str, float] = {}
    for key, value in condition.items():
        prop = key if key in PROPERTIES else ALIASES.get(str(key).lower())
        if prop is None:
            raise InputError(f"{name} key {key!r}", f"one of {', '.join(PROPERTIES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name}[{key!r}]", "a finite number", got=repr(value))
        lo, hi = RANGES[prop]
        if not lo <= value <= hi:
            raise InputError(f"{name}[{key!r}]", f"a {prop} target in [{lo:g}, {hi:g}] "
                             "(the range of the MOSES training molecules)", got=value)
        out[prop] = float(value)
    return out


def property_vector(targets: Mapping[str, float]) -> list[float]:
    """Canonical targets -> ``[z_logP, z_QED, z_SA, z_MW, m_logP, m_QED, m_SA, m_MW]``.

    ``z = (x - mean) / std`` for a given target, 0 for one left out; ``m`` is its presence flag.
    """
    values = [(targets[p] - MEAN[p]) / STD[p] if p in targets else 0.0 for p in PROPERTIES]
    return values + [1.0 if p in targets else 0.0 for p in PROPERTIES]


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
