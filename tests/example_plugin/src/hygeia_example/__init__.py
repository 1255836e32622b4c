"""hygeia-example-plugin: a third-party diagnoser, ``example-intensity``.

Six regional mean intensities (upper/lower lung zones on each side, heart, costophrenic
angles) feed a logistic regression per finding (effusion, cardiomegaly). Small, honest, and
trained on Hygeia phantoms with ``hygeia train example-intensity``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import hygeia
from hygeia import tensors
from hygeia.api import Diagnosis, Finding, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, save_bundle
from hygeia.validation import check_images, check_texts
from hygeia.vocab import finding

NAME, VERSION = "example-intensity", "0.1.0"
FINDINGS = ("effusion", "cardiomegaly")
SIZE = (64, 64)
WEIGHTS = Path(__file__).parent / "weights" / NAME
CARD = ModelCard(
    intended_use="Example for plugin authors; not for clinical use.",
    training_data="Hygeia phantoms (train split), 64x64.",
    limitations="Six hand-made intensity features; knows two findings only.",
)
# Regions as (row0, row1, col0, col1) fractions of the image.
ZONES = ((0.2, 0.5, 0.1, 0.45), (0.2, 0.5, 0.55, 0.9), (0.5, 0.8, 0.1, 0.45), (0.5, 0.8, 0.55, 0.9),
         (0.45, 0.8, 0.35, 0.7), (0.75, 0.95, 0.05, 0.95))


def features(images: np.ndarray) -> np.ndarray:
    """[B, 1, H, W] -> [B, 6] zone means."""
    _, _, h, w = images.shape
    return np.stack([images[:, 0, int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)].mean(axis=(1, 2))
                     for r0, r1, c0, c1 in ZONES], axis=1).astype(np.float32)


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


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, n_train: int = 3000, **_: Any) -> Path:
    """Fit the logistic regressions on phantoms (sklearn, deterministic)."""
    from sklearn.linear_model import LogisticRegression

    from hygeia_lab import make_phantom_set
    from hygeia.vocab import finding_index

    ps = make_phantom_set(n_train, split="train", size=SIZE[0], progress=progress)
    f = features(ps.images)
    mean, std = f.mean(0), f.std(0) + 1e-6
    z = (f - mean) / std
    w, b = [], []
    for lab in FINDINGS:
        y = ps.labels[:, finding_index(lab)]
        m = LogisticRegression(max_iter=1000, random_state=seed).fit(z, y)
        w.append(m.coef_[0]), b.append(m.intercept_[0])
    t = {"weight": torch.tensor(np.array(w), dtype=torch.float32), "bias": torch.tensor(np.array(b), dtype=torch.float32),
         "mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
    save_bundle(out, t, {"findings": list(FINDINGS), "thresholds": [0.5, 0.5], "seed": seed, "n_train": n_train}, CARD)
    return Path(out)


@hygeia.hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    yield PluginSpec(
        kind="diagnoser", name=NAME, version=VERSION,
        description="Example third-party diagnoser: zone intensities + logistic regression",
        factory=IntensityDiagnoser,
        **tensors.diagnoser(channels=1, size=SIZE, findings=len(FINDINGS)),
        model_card=CARD, train=train,
    )
