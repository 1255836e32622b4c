"""The ``example-intensity`` diagnoser: the class, its bundle, its model card and its spec."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import Diagnosis, Finding, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, save_bundle
from hygeia.validation import check_images, check_texts
from hygeia.vocab import finding

from .model import features

NAME, VERSION = "example-intensity", "0.1.0"
FINDINGS = ("effusion", "cardiomegaly")
SIZE = (64, 64)
WEIGHTS = Path(__file__).parent / "weights" / NAME
CARD = ModelCard(
    intended_use="Example for plugin authors; not for clinical use.",
    training_data="Hygeia phantoms (train split), 64x64.",
    limitations="Six hand-made intensity features; knows two findings only.",
)

class IntensityDiagnoser:
    input_size = SIZE
    findings = FINDINGS

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        b = load_bundle(bundle or WEIGHTS)
        self.weight, self.bias = b.tensors["weight"].numpy(), b.tensors["bias"].numpy()
        self.mean, self.std = b.tensors["mean"].numpy(), b.tensors["std"].numpy()
        self.thresholds = [float(t) for t in b.config["thresholds"]]
        self.config = b.config
        self.identity = ModelIdentity(NAME, VERSION, "diagnoser", b.sha256)

    def diagnose(self, images: Any, texts: Sequence[str] | None = None) -> list[Diagnosis]:
        x = check_images(images, size=SIZE)
        check_texts(texts, len(x))
        z = (features(x) - self.mean) / self.std
        p = 1.0 / (1.0 + np.exp(-(z @ self.weight.T + self.bias)))
        return [Diagnosis([Finding(lab, finding(lab).code, float(pi[k]), self.thresholds[k])
                           for k, lab in enumerate(FINDINGS)], self.identity, SIZE) for pi in p]

    def save(self, path: str | Path) -> str:
        t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
             dict(weight=self.weight, bias=self.bias, mean=self.mean, std=self.std).items()}
        return save_bundle(path, t, self.config, CARD)


SPEC = PluginSpec(
    kind="diagnoser", name=NAME, version=VERSION,
    description="Example third-party diagnoser: zone intensities + logistic regression",
    factory=IntensityDiagnoser,
    **tensors.diagnoser(channels=1, size=SIZE, findings=len(FINDINGS)),
    model_card=CARD, train="hygeia_example.train:train",
)
