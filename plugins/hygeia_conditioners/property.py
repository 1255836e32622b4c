"""The ``property`` conditioner: molecular property targets -> a normalised vector.

``encode([{"logP": 2.5, "QED": 0.8}, {}])`` returns float32 ``[B, 8]``: four standardised
targets (logP, QED, SA, MW; ``(x - mean) / std`` with the MOSES training-set statistics) and
four presence flags (1 where a target is given). A property left out is "don't care" (value 0,
flag 0), so one vector format serves full, partial and no conditioning. Targets outside the
range the models were trained on raise :class:`hygeia.errors.InputError`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from hygeia import tensors
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.errors import InputError
from hygeia.validation import check_condition

NAME, VERSION = "property", "1.0.0"
PROPERTIES: tuple[str, ...] = ("logP", "QED", "SA", "MW")
DIM = 2 * len(PROPERTIES)
# Mean and standard deviation over 3,000 random MOSES training molecules (RDKit Crippen logP,
# QED, Ertl SA score, average molecular weight in Da).
MEAN = {"logP": 2.450, "QED": 0.807, "SA": 2.460, "MW": 307.8}
STD = {"logP": 0.935, "QED": 0.0948, "SA": 0.460, "MW": 27.98}
# Accepted targets: the MOSES training range, slightly widened (MOSES keeps 250-350 Da).
RANGES = {"logP": (-3.0, 6.0), "QED": (0.0, 1.0), "SA": (1.0, 6.0), "MW": (240.0, 360.0)}
ALIASES = {"logp": "logP", "clogp": "logP", "qed": "QED", "sa": "SA", "sas": "SA", "mw": "MW",
           "weight": "MW", "molwt": "MW", "molecular_weight": "MW"}
CARD = ModelCard(
    intended_use="Encode molecular property targets (logP, QED, SA, MW) as a condition vector "
                 "for molecule generators.",
    training_data="None (no weights): standardisation constants from the MOSES training set.",
    metrics={},
    limitations="Targets must lie in the MOSES training range: " +
                ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in RANGES.items()) + ".",
)


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


class PropertyConditioner:
    """``encode([{"logP": 2.5}, {"QED": 0.9, "MW": 300}]) -> float32 [2, 8]``."""

    condition_kinds = frozenset({"properties"})
    dim = DIM
    properties = PROPERTIES

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.identity = ModelIdentity(NAME, VERSION, "conditioner", None)

    def vector(self, condition: Mapping[str, Any]) -> list[float]:
        """One condition as ``[z_logP, z_QED, z_SA, z_MW, m_logP, m_QED, m_SA, m_MW]``."""
        if condition != {}:
            check_condition(condition, self.condition_kinds, NAME)
        t = canonical_targets(condition)
        values = [(t[p] - MEAN[p]) / STD[p] if p in t else 0.0 for p in PROPERTIES]
        return values + [1.0 if p in t else 0.0 for p in PROPERTIES]

    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        if isinstance(conditions, (str, Mapping)) or not isinstance(conditions, Sequence) or not conditions:
            raise InputError("conditions", "a non-empty list of property dicts", got=repr(conditions)[:100])
        return torch.tensor([self.vector(c) for c in conditions], dtype=torch.float32, device=self.device)

    @staticmethod
    def normalise(values: Sequence[Sequence[float]]) -> torch.Tensor:
        """Measured properties ``[B, 4]`` (logP, QED, SA, MW) -> standardised ``[B, 4]``."""
        v = torch.as_tensor(values, dtype=torch.float32)
        mean = torch.tensor([MEAN[p] for p in PROPERTIES])
        std = torch.tensor([STD[p] for p in PROPERTIES])
        return (v - mean) / std


SPEC = PluginSpec(
    kind="conditioner",
    name=NAME,
    version=VERSION,
    description="Molecular property targets (logP, QED, SA, MW) -> standardised values + presence flags",
    factory=PropertyConditioner,
    **tensors.conditioner(dim=DIM),
    model_card=CARD,
)
