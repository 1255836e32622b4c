"""The ``label`` conditioner's trainer (``hygeia train label``): writes the embedding table as a bundle.

Nothing is learned: the table is :func:`hygeia_conditioners.model.build_table` (orthonormal rows
from a seeded Gaussian), saved with the label order and the seed, deterministic from ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hygeia.bundles import save_bundle
from hygeia.vocab import CONDITION_LABELS

from .model import LABEL_DIM, build_table
from .plugin import LABEL_CARD, LABEL_WEIGHTS


def train(out: str | Path = LABEL_WEIGHTS, seed: int = 0, progress: bool = True, **_: Any) -> Path:
    """Write the label table as a bundle (deterministic from ``seed``)."""
    config = {"labels": list(CONDITION_LABELS), "dim": LABEL_DIM, "seed": seed}
    save_bundle(out, {"embedding": build_table(seed)}, config, LABEL_CARD)
    return Path(out)
