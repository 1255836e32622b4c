"""The ``property`` encoding (no torch: shared by the conditioner and its frozen runner):
four standardised targets and four presence flags, with the MOSES statistics."""
from __future__ import annotations

import math
from typing import Any, Mapping

from hygeia.errors import InputError

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
