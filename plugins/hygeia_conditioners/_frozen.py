"""The conditioners served from their frozen files: no torch, no transformers.

:class:`FrozenLabel` (the label table), :class:`FrozenText` (the text encoder's ONNX graph and
tokenizer: pooled, L2-normalised sentence vectors, zeros for the null condition) and
:class:`FrozenProperty` (the property encoding) answer ``encode`` as the conditioners of
:mod:`hygeia_conditioners.plugin` do, with numpy arrays. ``hygeia triton build`` writes their
folders (:mod:`hygeia_conditioners._freeze`; see :mod:`hygeia.frozen`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.errors import InputError
from hygeia.frozen import model_identity
from hygeia.text import FrozenEncoder
from hygeia.validation import check_condition
from hygeia.vocab import finding

from ._properties import PROPERTY_DIM, canonical_targets, property_vector


def _check_batch(conditions: Any, expected: str, also_reject: tuple[type, ...] = (str,)) -> None:
    if isinstance(conditions, also_reject) or not isinstance(conditions, Sequence) or len(conditions) == 0:
        raise InputError("conditions", expected, got=repr(conditions)[:100])


def _read(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = Path(folder)
    return folder, json.loads((folder / "conditioner.json").read_text())


class FrozenLabel:
    """``encode(["effusion", "normal"]) -> float32 [2, 32]``."""

    condition_kinds = frozenset({"label"})

    def __init__(self, folder: str | Path) -> None:
        from safetensors.numpy import load_file

        folder, cfg = _read(folder)
        self.identity = model_identity(folder)
        self.labels: tuple[str, ...] = tuple(cfg["labels"])
        self.table = load_file(str(folder / "table.safetensors"))["embedding"]
        self.dim = int(self.table.shape[1])

    def encode(self, conditions: Sequence[Any]) -> np.ndarray:
        _check_batch(conditions, "a non-empty list of finding labels")
        for c in conditions:
            check_condition(c, self.condition_kinds, "label")
        return self.table[[self.labels.index(finding(c).label) for c in conditions]]


class FrozenText:
    """``encode(["left pleural effusion", ""]) -> float32 [2, 384]`` (the second row: zeros)."""

    condition_kinds = frozenset({"text", "label"})

    def __init__(self, folder: str | Path) -> None:
        folder, cfg = _read(folder)
        self.identity = model_identity(folder)
        self.encoder = FrozenEncoder(folder, int(cfg["pad_id"]))
        self.dim = int(cfg["text_dim"])

    def encode(self, conditions: Sequence[Any]) -> np.ndarray:
        """Pooled, L2-normalised sentence vectors ``[B, 384]``; zeros for the null condition."""
        _check_batch(conditions, "a non-empty list of strings (\"\" = unconditional)")
        texts = []
        for t in conditions:
            if t is None or (isinstance(t, str) and not t.strip()):
                texts.append("")
            else:
                check_condition(t, self.condition_kinds | {"none"}, "text")
                texts.append(t.strip())
        out = np.zeros((len(texts), self.dim), np.float32)
        rows = [i for i, t in enumerate(texts) if t]
        if rows:
            out[rows] = self.encoder.sentence_vectors([texts[i] for i in rows], name="conditions")
        return out


class FrozenProperty:
    """``encode([{"logP": 2.5}, {"QED": 0.9, "MW": 300}]) -> float32 [2, 8]``."""

    condition_kinds = frozenset({"properties"})
    dim = PROPERTY_DIM

    def __init__(self, folder: str | Path) -> None:
        self.identity = model_identity(folder)

    def encode(self, conditions: Sequence[Any]) -> np.ndarray:
        _check_batch(conditions, "a non-empty list of property dicts", also_reject=(str, Mapping))
        rows = []
        for c in conditions:
            if c != {}:
                check_condition(c, self.condition_kinds, "property")
            rows.append(property_vector(canonical_targets(c)))
        return np.asarray(rows, np.float32)
