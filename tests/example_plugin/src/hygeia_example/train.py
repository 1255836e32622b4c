"""Training ``example-intensity``: logistic regressions on the lab's phantoms (sklearn, deterministic)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia.bundles import save_bundle

from .model import features
from .plugin import CARD, FINDINGS, SIZE, WEIGHTS


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
