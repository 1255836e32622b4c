"""The ``diffusion`` generator's network, spaces and sampler.

Network: a diffusers ``UNet2DModel`` (:data:`UNET`) with a class embedding: one row per label of
:data:`hygeia.vocab.CONDITION_LABELS` plus a *null* row (:data:`NULL_CLASS`) for classifier-free
guidance. Training (:mod:`hygeia_diffusion.train`): DDPM (epsilon prediction, cosine noise
schedule, 1000 steps: :data:`SCHEDULER`). Sampling (:func:`denoise`): DDIM (eta = 0) or
DPM-Solver++ (multistep) with classifier-free guidance ``eps = eps_base + s * (eps_label - eps_base)``
computed in one batched forward pass.

Spaces (``mode``, :class:`Space`):

- ``pixel``: the 64x64 image in [-1, 1], folded into non-overlapping ``patch x patch`` pixel
  blocks (``pixel_unshuffle``: 1x64x64 -> 16x16x16 for ``patch=4``). Noise and denoising act on
  pixels, exactly as in pixel space; only the UNet sees the blocks as channels, which makes it
  about 16x cheaper than a UNet at full resolution (what CPU training allows).
- ``latent``: the 4x16x16 latent of the ``vae`` plugin's autoencoder, scaled to unit variance.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from hygeia.errors import InputError

from ._sampling import NULL_CLASS, SIZE  # noqa: F401  (the network's classes and image side)

UNET = dict(
    sample_size=16,
    in_channels=16,
    out_channels=16,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    num_class_embeds=NULL_CLASS + 1,
    norm_num_groups=16,
    attention_head_dim=32,
)
"""diffusers ``UNet2DModel`` arguments (channels and sample size follow the space: 4x16x16 latents for
the shipped latent-mode model, 16x16x16 pixel blocks in pixel mode with patch 4)."""

SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                 clip_sample=True, clip_sample_range=1.0)
"""diffusers ``DDPMScheduler`` arguments of training (latent mode turns ``clip_sample`` off)."""


class Space:
    """Maps images ``[B, 1, 64, 64]`` in [0, 1] to the diffusion space and back."""

    def __init__(self, mode: str, patch: int = 4, vae: Any = None, scaling: float = 1.0) -> None:
        if mode not in ("pixel", "latent"):
            raise InputError("mode", "'pixel' or 'latent'", got=repr(mode))
        if mode == "latent" and vae is None:
            raise InputError("vae", "an AutoencoderKL for latent mode", got=None)
        self.mode, self.patch, self.vae, self.scaling = mode, patch, vae, scaling

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if self.mode == "pixel":
            return F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x
        return self.vae.encode(x).latent_dist.mean * self.scaling

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel":
            x = F.pixel_shuffle(samples, self.patch) if self.patch > 1 else samples
        else:
            x = self.vae.decode(samples.to(next(self.vae.parameters()).dtype) / self.scaling).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


def make_scheduler(train_config: dict[str, Any], sampler: str) -> Any:
    """A sampling scheduler (``ddim``: DDIM, eta = 0; ``dpm``: DPM-Solver++ 2M) from the training config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(train_config)
    return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=2)


@torch.inference_mode()
def denoise(
    unet: Any,
    scheduler: Any,
    noise: torch.Tensor,
    class_labels: torch.Tensor,
    steps: int,
    guidance_scale: float,
    on_step: Callable[[int], Any] | None = None,
    dtype: torch.dtype | None = None,
    baseline_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (Hygeia's sampler; ``scheduler`` must be fresh).

    ``guidance_scale`` 1 uses the label prediction alone (one forward per step); any other value
    batches the label and baseline predictions into one forward pass and mixes them:
    ``eps = eps_base + s * (eps_label - eps_base)``. The baseline is the null class (classifier-free
    guidance) unless ``baseline_labels`` gives another class per sample: a *negative condition*,
    as diffusers' ``negative_prompt``; guiding a finding away from ``normal`` amplifies what tells
    the finding from a normal image rather than from the average of all conditions. Labels equal
    to the null class need no guidance. ``dtype`` (e.g. ``torch.bfloat16``) runs the UNet under
    autocast; the scheduler arithmetic stays float32.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0 and bool((class_labels != NULL_CLASS).any())
    base = torch.full_like(class_labels, NULL_CLASS) if baseline_labels is None else baseline_labels
    labels = torch.cat([class_labels, base]) if guided else class_labels
    fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t).contiguous(memory_format=fmt)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            eps = unet(inp, t.expand(len(inp)), class_labels=labels).sample.float()  # one timestep per row
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1)
    return x
