"""Building blocks for adversarially trained image generators (64x64, one channel, in [0, 1]).

Used by the built-in ``gan`` and ``vae`` trainers, and available to third-party generator plugins:

- :class:`ProjectionDiscriminator`: a spectrally normalised projection discriminator
  (Miyato & Koyama 2018, "cGANs with projection discriminator") for the hinge loss;
- :class:`FindingClassifier`: a small multi-label finding classifier ('normal' is every finding
  absent), and :func:`train_finding_classifier`, which trains one on *real training images*.
  A trainer freezes it and adds the auxiliary-classifier loss of AC-GAN (Odena et al. 2017),
  :func:`aux_loss`, to its generator: images asked for a condition should be classified as it.

The auxiliary classifier is separate from the discriminator on purpose: the spectrally
normalised discriminator's features barely separate the findings (a linear probe on them scored
36 % on six conditions), so a head there learned nothing. It is also separate from the ``cnn``
diagnoser that judges generators (``hygeia evaluate generator``): a different, smaller network,
trained here on the generator's own training images.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from hygeia.vocab import CONDITION_LABELS, FINDING_LABELS


def embed(maps: nn.ModuleDict, conds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of each conditioner's linear map of its rows: rows a conditioner does not condition
    are zero in its tensor, so they contribute nothing (and an all-zero row is unconditional)."""
    return sum(maps[k](v) for k, v in conds.items())  # type: ignore[return-value]


class ProjectionDiscriminator(nn.Module):
    """``D(x, e) = psi(phi(x)) + <proj(e), phi(x)>`` for ``x [B, 1, 64, 64]`` in [0, 1].

    ``dims``: ``{conditioner name: vector size}``; conditions arrive as ``{name: [B, D]}`` (one-hot
    label rows work too). All layers are spectrally normalised; features are sum-pooled.
    """

    def __init__(self, dims: dict[str, int], ch: int = 32) -> None:
        super().__init__()
        chans = [1, ch, 2 * ch, 4 * ch, 8 * ch]  # 64 -> 32 -> 16 -> 8 -> 4 px
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [spectral_norm(nn.Conv2d(a, b, 4, 2, 1)), nn.LeakyReLU(0.1)]
        layers += [spectral_norm(nn.Conv2d(chans[-1], chans[-1], 3, 1, 1)), nn.LeakyReLU(0.1)]
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(chans[-1], 1))
        self.proj = nn.ModuleDict({k: spectral_norm(nn.Linear(d, chans[-1], bias=False)) for k, d in dims.items()})

    def forward(self, x: torch.Tensor, conds: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.features(x * 2 - 1).sum(dim=(2, 3))  # global sum pooling
        return self.linear(h).squeeze(1) + (embed(self.proj, conds) * h).sum(1)


class FindingClassifier(nn.Module):
    """``[B, 1, 64, 64]`` in [0, 1] -> ``[B, len(FINDING_LABELS)]`` multi-label logits."""

    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        chans = [1, ch, 2 * ch, 4 * ch, 4 * ch]  # 64 -> 32 -> 16 -> 8 -> 4 px
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.GroupNorm(8, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], len(FINDING_LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3)))


def condition_targets() -> torch.Tensor:
    """``[len(CONDITION_LABELS), len(FINDING_LABELS)]``: row ``k`` is the finding vector of
    condition ``k`` ('normal': all zeros; a finding: one-hot)."""
    return _targets(torch.device("cpu")).clone()


@lru_cache(maxsize=None)
def _targets(device: torch.device) -> torch.Tensor:
    """The table of :func:`condition_targets`, built once per device (read-only: never mutate)."""
    t = torch.zeros(len(CONDITION_LABELS), len(FINDING_LABELS))
    for k, label in enumerate(CONDITION_LABELS):
        if label in FINDING_LABELS:
            t[k, FINDING_LABELS.index(label)] = 1.0
    return t.to(device)


def aux_loss(classifier: nn.Module, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """AC-GAN generator term: BCE of the classifier's logits on ``images`` against the finding
    vectors of ``conditions`` (indices into CONDITION_LABELS)."""
    targets = _targets(images.device)[conditions.to(images.device)]
    return F.binary_cross_entropy_with_logits(classifier(images), targets)


def train_finding_classifier(images: torch.Tensor, conditions: np.ndarray, steps: int = 3000, seed: int = 0,
                             batch_size: int = 64, lr: float = 3e-3, ch: int = 32,
                             log: Callable[[str], None] | None = None) -> FindingClassifier:
    """Train a :class:`FindingClassifier` on real images ``[N, 1, 64, 64]`` with their condition
    indices ``[N]`` (AdamW, one-cycle schedule; reproducible from ``seed`` on one device and
    thread count). Returns it frozen, in eval mode, on the images' device."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FindingClassifier(ch).to(images.device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    cond = torch.as_tensor(conditions)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = aux_loss(net, images[idx], cond[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 500 == 0 or step == steps):
            log(f"finding classifier: step {step}/{steps}  loss {loss.item():.3f}  {time.time() - t0:.0f}s")
    return net.eval().requires_grad_(False)
