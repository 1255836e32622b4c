"""A label-conditional normalizing-flow prior ``p(z | c)`` over the ``vae``'s latent (``prior="flow"``).

The VAE-with-a-learned-prior recipe: after the autoencoder is trained, a flow is fitted by
maximum likelihood to samples of its aggregate posterior ``q(z) = E_x q(z | x)`` (each training
image's posterior ``N(mu, sd)``, a fresh draw every epoch), conditioned on the image's label.
Sampling draws ``u ~ N(0, T^2 I)`` and maps it through the inverse flow. Unlike a Gaussian
family fitted to the latents, the flow is translation-equivariant and local (convolutions), so a
small finding at any position is one more local pattern, and its samples do not blend two
patients' anatomy.

Architecture: Glow-style (Kingma & Dhariwal 2018), built from FrEIA's ``AllInOneBlock`` (actnorm,
a fixed channel permutation, an affine coupling with clamped scales): the scaled latent
``[4, 16, 16]`` is squeezed (i-RevNet downsampling) to ``[16, 8, 8]``, then ``blocks`` coupling
blocks whose subnetworks (3x3 conv, 1x1 conv, 3x3 conv, ``hidden`` channels, last layer
zero-initialised) also see a learned embedding of the condition (``emb`` channels, broadcast over
the 8x8 grid). Rows of the embedding: :data:`hygeia_vae.image.PRIORS` (the labels, then the
pooled prior, trained by replacing the label with it on 10 % of the examples).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

LATENT = (4, 16, 16)
"""The vae latent the flow takes (unscaled latents are multiplied by the scaling factor first)."""
GRID = (16, 8, 8)
"""Shape of the flow's base noise per sample: the squeezed ``[4, 16, 16]`` latent."""


def _subnet(hidden: int) -> Callable[[int, int], nn.Module]:
    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                            nn.Conv2d(hidden, c_out, 3, padding=1))
        nn.init.zeros_(net[-1].weight)  # each block starts as the identity
        nn.init.zeros_(net[-1].bias)
        return net
    return make


class FlowPrior(nn.Module):
    """Conditional Glow over scaled latents ``[B, 4, 16, 16]``; condition rows index an embedding."""

    def __init__(self, n_conditions: int, blocks: int = 12, hidden: int = 96, emb: int = 8, seed: int = 0) -> None:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        super().__init__()
        self.config = {"blocks": blocks, "hidden": hidden, "emb": emb}
        torch.manual_seed(seed)
        np_state = np.random.get_state()  # FrEIA draws each block's channel permutation from numpy's global RNG
        np.random.seed(seed)
        try:
            self.embedding = nn.Embedding(n_conditions, emb)
            self.inn = Ff.SequenceINN(*LATENT)
            self.inn.append(Fm.IRevNetDownsampling)
            for _ in range(blocks):
                self.inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(emb, *GRID[1:]),
                                subnet_constructor=_subnet(hidden), affine_clamping=2.0, permute_soft=False)
        finally:
            np.random.set_state(np_state)

    def _cond(self, e: torch.Tensor) -> list[torch.Tensor]:
        return [e[:, :, None, None].expand(-1, -1, *GRID[1:])]

    def nll(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per dimension (nats) of scaled latents ``z`` under rows ``rows``."""
        u, logdet = self.inn(z, c=self._cond(self.embedding(rows)))
        d = u[0].numel()
        return (0.5 * u.pow(2).flatten(1).sum(1) - logdet).mean() / d + 0.5 * math.log(2 * math.pi)

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Scaled latents ``[B, 4, 16, 16]`` and condition embeddings ``[B, emb]`` -> base noise ``[B, 16, 8, 8]``."""
        u, _ = self.inn(z, c=self._cond(embedding), jac=False)  # sampling needs no log-determinant
        return u

    def inverse(self, u: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Base noise ``u [B, 16, 8, 8]`` and condition embeddings ``[B, emb]`` -> scaled latents ``[B, 4, 16, 16]``."""
        z, _ = self.inn(u, c=self._cond(embedding), rev=True, jac=False)
        return z


def train_flow_prior(mu: torch.Tensor, sd: torch.Tensor, rows: torch.Tensor, n_conditions: int, pooled_row: int,
                     epochs: int = 40, seed: int = 0, blocks: int = 12, hidden: int = 96, emb: int = 8,
                     batch_size: int = 64, lr: float = 1e-3, drop: float = 0.1,
                     report: Callable[[int, int, float], None] | None = None) -> tuple[FlowPrior, dict[str, float]]:
    """Fit a :class:`FlowPrior` to posterior samples ``mu + sd * eps`` (scaled latents ``[N, 4, 16, 16]``).

    AdamW with a one-cycle learning rate, gradient norm clipped at 5; a fraction ``drop`` of each
    batch gets the ``pooled_row`` condition. Reproducible from ``seed`` on one device and thread
    count. ``report(epoch, epochs, nll)`` after every epoch.
    """
    device = mu.device
    flow = FlowPrior(n_conditions, blocks, hidden, emb, seed).to(device)
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=0)
    batch_size = min(batch_size, len(mu))  # tiny runs (tests): one batch of everything
    steps = len(mu) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0, nll = time.time(), float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(len(mu), generator=g)
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size].to(device)
            z = mu[idx] + sd[idx] * torch.randn(len(idx), *mu.shape[1:], generator=g).to(device)
            r = rows[idx].clone()
            r[(torch.rand(len(idx), generator=g) < drop).to(device)] = pooled_row
            loss = flow.nll(z, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
        nll = total / steps
        if report is not None:
            report(epoch + 1, epochs, nll)
    return flow.eval().requires_grad_(False), {"prior_train_nll_per_dim": round(nll, 4),
                                               "prior_train_minutes": round((time.time() - t0) / 60, 1)}
