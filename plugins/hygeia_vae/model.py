"""The ``vae``'s networks: the KL autoencoder and the label-conditional normalizing flow.

Autoencoder: a small diffusers ``AutoencoderKL`` (3 levels, 16/32/64 channels, one ResNet block
each, no attention) that maps a 64x64 radiograph to a ``4 x 16 x 16`` latent. It is trained as a
VAE (Gaussian likelihood with a fixed decoder noise plus the KL to N(0, I)), so the latent space
is smooth enough both to sample from and to serve as the latent space of the ``diffusion`` plugin.

Flow: :class:`FlowPrior`, a label-conditional Glow (Kingma & Dhariwal 2018) over the scaled
latent, built from FrEIA's ``AllInOneBlock`` (actnorm, a fixed channel permutation, an affine
coupling with clamped scales). The latent ``[4, 16, 16]`` is squeezed (i-RevNet downsampling) to
``[16, 8, 8]``, then ``blocks`` coupling blocks whose subnetworks (3x3 conv, 1x1 conv, 3x3 conv,
``hidden`` channels, last layer zero-initialised) also see a learned embedding of the condition
(``emb`` channels, broadcast over the 8x8 grid). Its rows are the rows of the label priors
(:data:`PRIORS`: the labels, then the pooled prior). The shipped bundle uses it to
guide its mixture prior; with ``prior="flow"`` it is the prior itself. Being convolutional, it is
translation-equivariant and local: a small finding at any position is one more local pattern.

The label priors themselves (fitting and sampling) are in :mod:`hygeia_vae._prior`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ._bundle import SIZE
from ._sampling import GRID, NO_NEGATIVE, PRIORS  # noqa: F401  (defined torch-free, for the frozen runner)

AUTOENCODER = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=SIZE,
    mid_block_add_attention=False,
)
"""diffusers ``AutoencoderKL`` arguments of the shipped model (64x64x1 -> 4x16x16)."""

LATENT = (4, 16, 16)
"""The vae latent the flow takes (unscaled latents are multiplied by the scaling factor first)."""


def build_autoencoder(config: dict[str, Any] | None = None) -> Any:
    """A diffusers ``AutoencoderKL`` from its config (default: :data:`AUTOENCODER`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or AUTOENCODER))


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
