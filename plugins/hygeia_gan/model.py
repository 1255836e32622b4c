"""Networks of the ``gan`` generator (DCGAN-sized, so that it trains on a CPU): a generator with
condition-modulated group norm for 64x64 grayscale images.

Conditions arrive as ``{conditioner name: [B, D]}``: each conditioner's vectors (``label`` 32-d,
``text`` 384-d, ...) get their own learned linear map, and the maps' outputs are summed
(:func:`embed`); a row a conditioner does not condition is zero in its tensor. The null condition
(unconditional) is all zeros: the generator's modulation then falls back to its biases.

The discriminator it is trained against (a spectrally normalised projection discriminator,
Miyato & Koyama 2018) is the lab's :class:`hygeia_lab.adversarial.ProjectionDiscriminator`, used
by :mod:`hygeia_gan.train` only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hygeia.errors import InputError


def embed(maps: nn.ModuleDict, conds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of each conditioner's linear map of its rows: rows a conditioner does not condition
    are zero in its tensor, so they contribute nothing (and an all-zero row is unconditional).
    The same sum as :func:`hygeia_lab.adversarial.embed` (the discriminator's)."""
    return sum(maps[k](v) for k, v in conds.items())  # type: ignore[return-value]


class CondNorm(nn.Module):
    """Group norm whose scale and shift are predicted from ``[z, e]`` (independent of the batch,
    so an image depends only on its own noise and condition)."""

    def __init__(self, ch: int, cdim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, max(1, ch // 4)), ch, affine=False)
        self.affine = nn.Linear(cdim, 2 * ch)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g, b = self.affine(c).chunk(2, dim=1)
        return self.norm(x) * (1 + g[:, :, None, None]) + b[:, :, None, None]


UPSAMPLING = ("transposed", "resize")
"""How the generator doubles resolution: ``resize`` (the default: nearest-neighbour upsampling then
a 3x3 convolution, which cannot produce checkerboard artifacts: Odena, Dumoulin & Olah 2016, with
one more 3x3 convolution at 64 px before the output) or ``transposed`` (stride-2 transposed
convolutions, the DCGAN layer; what a bundle without the ``upsampling`` key uses)."""


def _up(a: int, b: int, mode: str) -> nn.Module:
    if mode == "transposed":
        return nn.ConvTranspose2d(a, b, 4, 2, 1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, 1, 1))


class Generator(nn.Module):
    """``G(z [B, z_dim], {conditioner: [B, D]}) -> [B, 1, 64, 64]`` in [0, 1]."""

    def __init__(self, dims: dict[str, int], z_dim: int = 96, embed_dim: int = 64, ch: int = 32,
                 upsampling: str = "resize") -> None:
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise InputError("upsampling", " or ".join(UPSAMPLING), got=repr(upsampling))
        self.z_dim = z_dim
        self.embed = nn.ModuleDict({k: nn.Linear(d, embed_dim, bias=False) for k, d in dims.items()})
        chans = [8 * ch, 4 * ch, 2 * ch, ch]  # at 4, 8, 16, 32 px
        cdim = z_dim + embed_dim
        self.fc = nn.Linear(cdim, chans[0] * 16)
        self.norms = nn.ModuleList([CondNorm(c, cdim) for c in chans])
        self.ups = nn.ModuleList([_up(a, b, upsampling) for a, b in zip(chans[:-1], chans[1:])])
        if upsampling == "transposed":
            self.out: nn.Module = nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1)  # 32 -> 64 px
        else:  # 32 -> 64 px, then a 3x3 refinement at full resolution
            self.out = nn.Sequential(_up(chans[-1], chans[-1], upsampling), nn.ReLU(), nn.Conv2d(chans[-1], 1, 3, 1, 1))

    def forward(self, z: torch.Tensor, conds: dict[str, torch.Tensor]) -> torch.Tensor:
        c = torch.cat([z, embed(self.embed, conds)], dim=1)  # every layer sees noise and condition
        h = self.fc(c).view(z.shape[0], -1, 4, 4)
        for norm, up in zip(self.norms[:-1], self.ups):
            h = up(F.relu(norm(h, c)))
        return torch.sigmoid(self.out(F.relu(self.norms[-1](h, c))))
