"""hygeia_lab.adversarial: the projection discriminator, the finding classifier of the AC-GAN term."""
from __future__ import annotations

import numpy as np
import torch

from hygeia_lab.adversarial import (FindingClassifier, ProjectionDiscriminator, aux_loss, condition_targets,
                                train_finding_classifier)
from hygeia.vocab import CONDITION_LABELS, FINDING_LABELS


def test_condition_targets():
    t = condition_targets()
    assert t.shape == (len(CONDITION_LABELS), len(FINDING_LABELS))
    assert t[CONDITION_LABELS.index("normal")].sum() == 0, "normal: every finding absent"
    for label in FINDING_LABELS:
        row = t[CONDITION_LABELS.index(label)]
        assert row.sum() == 1 and row[FINDING_LABELS.index(label)] == 1


def test_projection_term_vanishes_for_the_null_condition():
    torch.manual_seed(0)
    d = ProjectionDiscriminator({"label": 6}, ch=8).eval()
    x = torch.rand(4, 1, 64, 64)
    null = d(x, {"label": torch.zeros(4, 6)})
    h = d.features(x * 2 - 1).sum(dim=(2, 3))
    assert torch.allclose(null, d.linear(h).squeeze(1), atol=1e-6)
    labelled = d(x, {"label": torch.eye(6)[[1, 1, 2, 2]]})
    assert not torch.allclose(null, labelled)


def _toy(n: int = 96) -> tuple[torch.Tensor, np.ndarray]:
    """'normal' = dark images, 'cardiomegaly' = a bright disc in the middle."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 64, 64, generator=g) * 0.2
    cls = np.array([0, CONDITION_LABELS.index("cardiomegaly")] * (n // 2))
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).float()
    x[torch.from_numpy(cls > 0)] += 0.7 * disc
    return x, cls


def test_finding_classifier_learns_and_is_reproducible_and_frozen():
    x, cls = _toy()
    a = train_finding_classifier(x, cls, steps=60, seed=0, batch_size=16, ch=8)
    b = train_finding_classifier(x, cls, steps=60, seed=0, batch_size=16, ch=8)
    c = train_finding_classifier(x, cls, steps=60, seed=1, batch_size=16, ch=8)
    assert isinstance(a, FindingClassifier) and not a.training
    assert not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    k = FINDING_LABELS.index("cardiomegaly")
    with torch.no_grad():
        p = torch.sigmoid(a(x))[:, k].numpy()
    assert p[cls > 0].min() > p[cls == 0].max(), "separates the toy classes"
    right = aux_loss(a, x, torch.from_numpy(cls))
    wrong = aux_loss(a, x, torch.from_numpy(np.where(cls > 0, 0, CONDITION_LABELS.index("cardiomegaly"))))
    assert right < wrong
