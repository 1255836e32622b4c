"""The ``label`` conditioner: a finding label ('normal', 'nodule', ...) -> a fixed embedding.

The embedding table holds one unit vector per label of :data:`hygeia.vocab.CONDITION_LABELS`,
drawn orthogonally from a seed, so distinct labels are maximally distinct and the table is the
same on every machine. Generators that learn their own label embedding start from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from hygeia import tensors
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_condition
from hygeia.vocab import CONDITION_LABELS, finding

NAME, VERSION, DIM = "label", "1.0.0", 32
WEIGHTS = Path(__file__).parent / "weights" / "label"
CARD = ModelCard(
    intended_use="Encode a finding label from the Hygeia vocabulary as a condition vector for generators.",
    training_data="None: a seeded orthogonal table, one row per label (normal + 5 findings).",
    metrics={"pairwise_cosine_max": 0.0},
    limitations="Knows only the labels of hygeia.vocab; synonyms map to their label.",
)


class LabelConditioner:
    """``encode(["effusion", "normal"]) -> float32 [2, 32]``."""

    condition_kinds = frozenset({"label"})
    dim = DIM

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        b = load_bundle(bundle or WEIGHTS)
        self.labels: tuple[str, ...] = tuple(b.config["labels"])
        self.table = b.tensors["embedding"].float()
        self.device = torch.device(device or "cpu")
        self.table = self.table.to(self.device)
        self.identity = ModelIdentity(NAME, VERSION, "conditioner", b.sha256)
        self.config = b.config

    def index(self, condition: Any) -> int:
        check_condition(condition, self.condition_kinds, NAME)
        return self.labels.index(finding(condition).label)

    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        if isinstance(conditions, str) or not isinstance(conditions, Sequence) or len(conditions) == 0:
            raise InputError("conditions", "a non-empty list of finding labels", got=repr(conditions)[:100])
        idx = torch.tensor([self.index(c) for c in conditions], device=self.device)
        return self.table[idx]

    def save(self, path: str | Path) -> str:
        return save_bundle(path, {"embedding": self.table}, self.config, CARD)


def build_table(seed: int = 0, dim: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, len(CONDITION_LABELS), generator=g))
    return q.T.contiguous().float()  # [6, dim], orthonormal rows


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, **_: Any) -> Path:
    """Write the label table as a bundle (deterministic from ``seed``)."""
    save_bundle(out, {"embedding": build_table(seed)}, {"labels": list(CONDITION_LABELS), "dim": DIM, "seed": seed}, CARD)
    return Path(out)


SPEC = PluginSpec(
    kind="conditioner",
    name=NAME,
    version=VERSION,
    description="Finding label (hygeia.vocab, SNOMED CT coded) -> 32-d orthonormal embedding",
    factory=LabelConditioner,
    **tensors.conditioner(dim=DIM),
    model_card=CARD,
    train=train,
)
