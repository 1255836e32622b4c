"""``vae``: an image VAE (diffusers ``AutoencoderKL``) with a label-conditional latent prior.

The autoencoder (:mod:`hygeia_vae.model`) maps a 64x64 radiograph to a ``4 x 16 x 16`` latent;
it is also the latent space of the ``diffusion`` plugin (:meth:`ImageVAE.encode` / ``decode``).

Conditional generation: a prior ``p(z | c)`` per label of :data:`hygeia.vocab.CONDITION_LABELS`,
plus a pooled one for ``condition=None`` (rows of :data:`PRIORS`), fitted to the posterior means
of each condition's training images (:mod:`hygeia_vae._prior`). The shipped bundle's prior is a
Gaussian mixture in the label's top principal directions (``prior="pca-gmm"``); bundles may also
hold one low-rank-plus-diagonal Gaussian per label (``prior="gaussian"``) or a conditional
normalizing flow over the whole latent (``prior="flow"``). Sampling draws ``z ~ p(z | c)`` (noise
scaled by ``temperature``) and decodes it; ``generate`` and the draws are
:mod:`hygeia_vae._sampling` (torch-free, shared with the frozen runner of
:mod:`hygeia_vae._frozen`).

Guidance (``guidance_scale`` s, ``negative_condition`` b, defaults from the bundle) has three forms:

- flow-paired (``config["prior"]["guidance"] == "flow"``, the shipped bundle): a conditional flow
  trained beside the mixture maps a sample ``z`` to its base noise under ``c`` and back under ``b``
  (``z_b``, the same sample without the finding); the guided latent is ``z_b + s (z - z_b)``;
- mean shift (``"mean"``, and bundles without a flow): the sample is shifted by
  ``(s - 1) (mean_c - mean_b)``, what ``p(z|c)^s p(z|b)^(1-s)`` gives for two Gaussians of one
  covariance, the same negative-condition guidance as the ``diffusion`` and ``gan`` plugins;
- for a flow prior, the same base noise is mapped under ``c`` and ``b`` and
  ``z = z_b + s (z_c - z_b)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.compiled import method_module

from ._bundle import CARD, NAME, VERSION, WEIGHTS
from ._sampling import PRIORS, Sampling, sampling_defaults
from .model import FlowPrior, build_autoencoder


class ImageVAE(Sampling):
    """Label-conditional image VAE: ``generate(n, condition="effusion", seed=0)``.

    ``bundle``: another trained bundle than the shipped one; ``device``: ``"cpu"``, ``"cuda"``
    or None (CUDA when available).
    """

    freeze_probes = [{"guidance_scale": 1.0, "temperature": 0.8}, {"negative_condition": "none", "batch_size": 1}]
    """Options :func:`hygeia.frozen.check_generator` also compares the frozen runner on."""

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        b = load_bundle(bundle or WEIGHTS)
        self.config: dict[str, Any] = b.config
        self.card = b.card
        self._tensors = b.tensors  # kept as loaded: save() writes exactly these bytes again
        self.device = pick_device(device)
        self.identity = ModelIdentity(NAME, VERSION, "generator", b.sha256)
        ae = build_autoencoder(self.config["autoencoder"])
        ae.load_state_dict({k[len("autoencoder."):]: v for k, v in b.tensors.items() if k.startswith("autoencoder.")})
        self.autoencoder = ae.eval().requires_grad_(False).to(self.device)
        self._decoder = method_module(self.autoencoder, "decode")  # what compiled execution replaces
        self.latent_shape: tuple[int, int, int] = tuple(self.config["latent_shape"])  # type: ignore[assignment]
        self.prior = {k[len("prior."):]: v.float().to(self.device) for k, v in b.tensors.items()
                      if k.startswith("prior.") and not k.startswith("prior.flow.")}
        self.flow: Any = None  # the flow's network: the prior itself (kind "flow") or the mixture's guide
        prior_config = self.config.get("prior", {"kind": "gaussian"})
        self.prior_kind: str = prior_config["kind"]
        if "flow" in prior_config:
            fc = prior_config["flow"]
            flow = FlowPrior(len(PRIORS), fc["blocks"], fc["hidden"], fc["emb"])
            flow.load_state_dict({k[len("prior.flow."):]: v for k, v in b.tensors.items()
                                  if k.startswith("prior.flow.")})
            self.flow = flow.eval().requires_grad_(False).to(self.device)
        self.defaults = sampling_defaults(self.config)
        self.prior_arrays = {k: v.cpu().numpy() for k, v in self.prior.items()}
        self.has_flow = self.flow is not None

    # -- latent space (used by the diffusion plugin's latent mode) ---------------------
    @property
    def scaling_factor(self) -> float:
        """Multiply latents by this to get unit variance (diffusers' convention)."""
        return float(self.autoencoder.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 1, 64, 64]`` in [0, 1] -> posterior means ``[B, 4, 16, 16]`` (unscaled)."""
        return self.autoencoder.encode(images.to(self.device) * 2 - 1).latent_dist.mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 4, 16, 16]`` (unscaled) -> images ``[B, 1, 64, 64]`` in [0, 1]."""
        return ((self._decoder(latents.to(self.device)).sample + 1) / 2).clamp(0, 1)

    def export_module(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """The autoencoder's decoder and an example latent batch, for compiled execution (:mod:`hygeia.compiled`)."""
        c = int(self.autoencoder.config.latent_channels)
        size = int(self.autoencoder.config.sample_size) // 2 ** (len(self.autoencoder.config.block_out_channels) - 1)
        return self._decoder, torch.zeros(1, c, size, size)

    # -- generation (``generate``: :class:`~hygeia_vae._sampling.Sampling`) ------------------
    def _images(self, z: np.ndarray, row: int, base: int, scale: float) -> np.ndarray:
        zb = torch.from_numpy(np.ascontiguousarray(z)).to(self.device)
        if self.prior_kind == "flow":
            zb = self._flow_latents(zb, row, base, scale)
        elif scale != 1.0 and self.flow is not None:
            zb = self._flow_guided(zb, row, base, scale)
        return self.decode(zb).float().cpu().numpy()

    def freeze(self, folder: Path) -> str:
        """Save this model's sampling for serving without torch (:mod:`hygeia.frozen`): the decoder
        and the guiding flow as ONNX graphs, the priors, the text encoder for free-text conditions;
        returns the runner, :class:`~hygeia_vae._frozen.FrozenVae`."""
        from ._freeze import freeze

        return freeze(self, Path(folder))

    def _flow_latents(self, u: torch.Tensor, row: int, base: int, scale: float) -> torch.Tensor:
        """Flow prior: base noise ``u`` -> latents of condition ``row``; guided (``scale`` != 1) as
        ``z_b + s (z_c - z_b)``, where ``z_b`` is the same noise mapped under the negative ``base``."""
        z = self.flow.inverse(u, self._embed(row, len(u)))
        return self._paired(u, z, base, scale) if scale != 1.0 else z / self.scaling_factor

    @torch.no_grad()
    def _flow_guided(self, z: torch.Tensor, row: int, base: int, scale: float) -> torch.Tensor:
        """Flow-paired guidance of prior samples ``z`` (unscaled latents of condition ``row``): the
        flow maps each to its base noise under ``row`` and back under ``base`` (the same sample
        without the finding, ``z_b``); returns ``z_b + s (z - z_b)``."""
        x = z * self.scaling_factor
        return self._paired(self.flow(x, self._embed(row, len(x))), x, base, scale)

    def _embed(self, row: int, n: int) -> torch.Tensor:
        return self.flow.embedding.weight[row].expand(n, -1)

    def _paired(self, u: torch.Tensor, x: torch.Tensor, base: int, scale: float) -> torch.Tensor:
        """``z_b + s (x - z_b)`` with ``z_b`` = noise ``u`` mapped under ``base``; scaled -> unscaled latents."""
        zb = self.flow.inverse(u, self._embed(base, len(u)))
        return (zb + scale * (x - zb)) / self.scaling_factor

    def save(self, path: str | Path) -> str:
        """Write this model's bundle to ``path``; returns the weights' SHA-256."""
        return save_bundle(path, self._tensors, self.config, self.card)


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Image VAE (diffusers AutoencoderKL, 4x16x16 latent) with a label-conditional latent prior "
                "(a Gaussian mixture per label, guided through a conditional flow); 64x64 DX",
    factory=ImageVAE,
    **tensors.generator("image"),
    model_card=CARD,
    train="hygeia_vae.train:train",
)
