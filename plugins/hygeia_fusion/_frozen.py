"""The fusion diagnoser served from its frozen graphs: no torch, no MONAI, no transformers.

:class:`FrozenFusion` loads what :mod:`hygeia_fusion._freeze` wrote (``hygeia triton build``
does this for the Triton model; see :mod:`hygeia.frozen`) and answers ``diagnose`` as
:class:`~hygeia_fusion.plugin.FusionDiagnoser` does: the same input checks, the text encoded the
same way (length-sorted batches of 64, empty text = no text, truncation past ``max_tokens`` with a
warning), the same thresholds and regions (:func:`hygeia_fusion._results.diagnoses`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.api import Diagnosis
from hygeia.frozen import OnnxGraph, model_identity
from hygeia.text import FrozenEncoder
from hygeia.validation import check_images, check_texts
from hygeia.vocab import bundle_codes

from ._results import diagnoses

ENCODER_BATCH = 64  # as hygeia_fusion.model.encode_texts


class FrozenFusion:
    """``diagnose(images [B,1,H,W], texts=None, heatmaps=True) -> list[Diagnosis]`` from a frozen folder."""

    condition_kinds = frozenset({"text", "none"})

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg = json.loads((folder / "fusion.json").read_text())
        self.findings: tuple[str, ...] = tuple(cfg["findings"])
        self.input_size: tuple[int, int] = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
        self.thresholds = np.asarray(cfg["thresholds"], np.float32)
        self.thresholds_no_text = np.asarray(cfg["thresholds_no_text"], np.float32)
        self.codes = bundle_codes(cfg["config"], self.findings)
        self.max_tokens, self.regions, self.use_text = int(cfg["max_tokens"]), cfg["regions"], bool(cfg["use_text"])
        self.batch_size = int(cfg["batch_size"])
        self.identity = model_identity(folder)  # recorded by hygeia.frozen.freeze
        self.image_graph = OnnxGraph(folder / "fusion_image.onnx")
        if self.use_text:
            self.text_dim = int(cfg["text_dim"])
            self.encoder = FrozenEncoder(folder, int(cfg["pad_id"]))
            self.text_graph = OnnxGraph(folder / "fusion_text.onnx")

    def _states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token states ``[B, max_tokens, D]`` and mask ``[B, max_tokens]``, as the plugin pads them."""
        tok = self.encoder.tokens(texts, self.max_tokens)
        ids, am = tok.input_ids, tok.attention_mask
        lengths = am.sum(1)
        order = np.argsort(lengths, kind="stable")
        hidden = np.zeros((len(texts), self.max_tokens, self.text_dim), np.float32)
        for i in range(0, len(texts), ENCODER_BATCH):
            j = order[i:i + ENCODER_BATCH]
            t = int(lengths[j].max())
            hidden[j, :t] = self.encoder.states(ids[j, :t], am[j, :t])
        mask = np.zeros((len(texts), self.max_tokens), np.int64)
        mask[:, :am.shape[1]] = am
        mask[[i for i, t in enumerate(texts) if not t.strip()]] = 0
        return hidden, mask

    def predict(self, images: Any, texts: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[B, F]`` and heat maps ``[B, F, H, W]`` in [0, 1]."""
        a = check_images(images, size=self.input_size, channels=1, name="images")
        tx = check_texts(texts, len(a), name="texts")
        if not self.use_text or (tx is not None and not any(t.strip() for t in tx)):
            tx = None
        probs, heat = [], []
        for i in range(0, len(a), self.batch_size):
            x = np.ascontiguousarray(a[i:i + self.batch_size])
            if tx is None:
                p, m = self.image_graph(images=x)
            else:
                states, mask = self._states(tx[i:i + self.batch_size])
                p, m = self.text_graph(images=x, states=states, mask=mask)
            probs.append(p)
            heat.append(m)
        return np.concatenate(probs), np.concatenate(heat)

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool = True) -> list[Diagnosis]:
        """One Diagnosis per image, as :meth:`FusionDiagnoser.diagnose <hygeia_fusion.plugin.FusionDiagnoser.diagnose>`."""
        probs, heat = self.predict(images, texts)
        tx = check_texts(texts, len(probs), name="texts") if self.use_text else None
        return diagnoses(probs, heat, tx, self, self.identity, heatmaps)
