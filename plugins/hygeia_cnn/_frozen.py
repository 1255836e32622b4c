"""The ``cnn`` and ``cxr`` diagnosers served from their frozen graphs: no torch, no MONAI.

:class:`FrozenCnn` loads what :mod:`hygeia_cnn._freeze` wrote (``hygeia triton build`` does this
for the Triton model; see :mod:`hygeia.frozen`) and answers ``diagnose`` as
:class:`~hygeia_cnn.plugin.CnnDiagnoser` does: the same checks, probabilities and activations from
one pass, heat maps (Grad-CAM or HiResCAM, all findings or ``"present"`` ones) from the
activations, the same thresholds and regions (:func:`hygeia_cnn._results.diagnoses`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.api import Diagnosis
from hygeia.frozen import OnnxGraph, model_identity
from hygeia.validation import check_heatmaps, check_images, check_texts
from hygeia.vocab import bundle_codes

from ._results import diagnoses

CAM_ROWS = 64  # (image, finding) maps per call of the heat-map graph


class FrozenCnn:
    """``diagnose(images [B,1,H,W], texts=None, heatmaps=None) -> list[Diagnosis]`` from a frozen folder."""

    heatmap_modes = (False, True, "present")

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg = json.loads((folder / "cnn.json").read_text())
        self.findings: tuple[str, ...] = tuple(cfg["findings"])
        self.input_size: tuple[int, int] = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
        self.thresholds = np.asarray(cfg["thresholds"], np.float64)
        self.codes = bundle_codes(cfg["config"], self.findings)
        self.heatmaps, self.batch_size = bool(cfg["heatmaps"]), int(cfg["batch_size"])
        self.identity = model_identity(folder)  # recorded by hygeia.frozen.freeze
        self.features = OnnxGraph(folder / "features.onnx")
        self.cams = OnnxGraph(folder / "cams.onnx")

    def _maps(self, acti: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Heat maps ``[B, F, H, W]`` of ``where``'s True (image, finding) pairs (zeros elsewhere)."""
        maps = np.zeros((len(acti), len(self.findings), *self.input_size), np.float32)
        rows = np.argwhere(where)
        eye = np.eye(len(self.findings), dtype=np.float32)
        for i in range(0, len(rows), CAM_ROWS):
            b, k = rows[i:i + CAM_ROWS, 0], rows[i:i + CAM_ROWS, 1]
            maps[b, k] = self.cams(activations=np.ascontiguousarray(acti[b]), classes=eye[k])[0]
        return maps

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool | str | None = None
                 ) -> list[Diagnosis]:
        """One Diagnosis per image, as :meth:`CnnDiagnoser.diagnose <hygeia_cnn.plugin.CnnDiagnoser.diagnose>`."""
        x = check_images(images, size=self.input_size)
        check_texts(texts, len(x))  # accepted and checked; this model is image-only
        check_heatmaps(heatmaps, self.heatmap_modes)
        want = self.heatmaps if heatmaps is None else heatmaps
        probs = np.zeros((len(x), len(self.findings)), np.float32)
        maps = np.zeros((len(x), len(self.findings), *self.input_size), np.float32) if want else None
        for i in range(0, len(x), self.batch_size):
            xb = np.ascontiguousarray(x[i:i + self.batch_size])
            if maps is None:  # the activations stay inside the graph
                probs[i:i + len(xb)] = self.features.run(["probabilities"], images=xb)[0]
                continue
            p, acti = self.features(images=xb)
            probs[i:i + len(p)] = p
            where = p >= self.thresholds[None, :] if want == "present" else np.ones(p.shape, bool)
            maps[i:i + len(p)] = self._maps(acti, where)
        return diagnoses(probs, maps, want, self, self.identity)
