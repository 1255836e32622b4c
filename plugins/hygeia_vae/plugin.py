"""``vae``: an image VAE (diffusers ``AutoencoderKL``) with a label-conditional latent prior.

The autoencoder (:mod:`hygeia_vae.model`) maps a 64x64 radiograph to a ``4 x 16 x 16`` latent;
it is also the latent space of the ``diffusion`` plugin (:meth:`ImageVAE.encode` / ``decode``).

Conditional generation: a prior ``p(z | c)`` per label of :data:`hygeia.vocab.CONDITION_LABELS`,
plus a pooled one for ``condition=None`` (rows of :data:`PRIORS`), fitted to the posterior means
of each condition's training images (:mod:`hygeia_vae._prior`). The shipped bundle's prior is a
Gaussian mixture in the label's top principal directions (``prior="pca-gmm"``); bundles may also
hold one low-rank-plus-diagonal Gaussian per label (``prior="gaussian"``) or a conditional
normalizing flow over the whole latent (``prior="flow"``). Sampling draws ``z ~ p(z | c)`` (noise
scaled by ``temperature``) and decodes it.

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
from typing import Any, Callable

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import GeneratedImage, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.compiled import method_module
from hygeia.errors import InputError
from hygeia.text import label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CONDITION_LABELS

from ._bundle import CARD, MAX_GUIDANCE, MAX_N, NAME, PIXEL_SPACING, VERSION, WEIGHTS, check_temperature
from ._prior import sample_prior
from .model import GRID as FLOW_GRID
from .model import NO_NEGATIVE, PRIORS, FlowPrior, build_autoencoder


class ImageVAE:
    """Label-conditional image VAE: ``generate(n, condition="effusion", seed=0)``.

    ``bundle``: another trained bundle than the shipped one; ``device``: ``"cpu"``, ``"cuda"``
    or None (CUDA when available).
    """

    output = "image"
    condition_kinds = frozenset({"none", "label", "text"})  # text: mapped to the closest label
    max_n = MAX_N

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
        sampling = self.config.get("sampling", {})  # no key: a bundle without sampling defaults, unguided
        self.defaults = {"guidance_scale": float(sampling.get("guidance_scale", 1.0)),
                         "negative_condition": str(sampling.get("negative_condition", NO_NEGATIVE)),
                         "temperature": float(sampling.get("temperature", 1.0))}

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

    # -- generation -------------------------------------------------------------------
    def generate(
        self,
        n: int,
        condition: Any = None,
        seed: int = 0,
        progress: Callable[[int, int], Any] | None = None,
        temperature: float | None = None,
        batch_size: int = 256,
        guidance_scale: float | None = None,
        negative_condition: str | None = None,
        **options: Any,
    ) -> list[GeneratedImage]:
        """``n`` images for ``condition`` (a finding label, or None), reproducible from ``seed``.

        ``temperature`` in (0, 2] scales the prior's noise (lower: closer to the label's mean
        image, less diverse; default: the bundle's, else 1). ``guidance_scale`` in [0, 20] (1:
        unguided) and ``negative_condition`` (a label or ``"none"``: the pooled prior) guide the
        sample away from the negative (module docstring: flow-paired when the bundle has a guiding
        flow, else a mean shift); default: the bundle's (shipped: 7 away from ``normal``,
        flow-paired); the null condition and a condition equal to its negative are not guided.
        ``progress(done, total)`` is called after each decoded batch.
        """
        n = check_n(n, max_n=self.max_n)
        seed = check_seed(seed)
        if options:
            raise InputError("generate options", "temperature, batch_size, guidance_scale, negative_condition, "
                             "progress", got=", ".join(sorted(options)))
        kind, label, text_match = label_condition(condition, self.condition_kinds, CONDITION_LABELS, NAME)
        temperature, scale, negative = self._sampling_options(temperature, batch_size, guidance_scale,
                                                              negative_condition)
        row, base = PRIORS.index(label or "none"), PRIORS.index(negative)
        if row == base or label is None or scale == 1.0:  # nothing to guide
            scale, negative = 1.0, None
        z = self._draw(n, row, base, scale, seed, float(temperature))
        out: list[np.ndarray] = []
        for start in range(0, n, batch_size):
            zb = z[start:start + batch_size].to(self.device)
            if self.prior_kind == "flow":
                zb = self._flow_latents(zb, row, base, scale)
            elif scale != 1.0 and self.flow is not None:
                zb = self._flow_guided(zb, row, base, scale)
            out.append(self.decode(zb).float().cpu().numpy())
            if callable(progress):  # progress=False/None: no callback
                progress(min(start + batch_size, n), n)
        pixels = np.concatenate(out).astype(np.float32)
        prov = {"generator": NAME, "version": VERSION, "weights_sha256": self.identity.weights_sha256,
                "condition_kind": kind, "temperature": float(temperature), "sampler": "label-conditional latent prior",
                "guidance_scale": scale, "negative_condition": negative,
                **text_match}
        return [
            GeneratedImage(np.ascontiguousarray(pixels[i]), PIXEL_SPACING, "DX", seed, label, self.identity,
                           {**prov, "index": i})
            for i in range(n)
        ]

    def _sampling_options(self, temperature: Any, batch_size: Any, guidance_scale: Any,
                          negative_condition: Any) -> tuple[Any, float, str]:
        """Checked ``(temperature, guidance scale, negative condition)``, the bundle's defaults filled in."""
        if temperature is None:
            temperature = self.defaults["temperature"]
        check_temperature(temperature)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", got=repr(batch_size))
        scale = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                     MAX_GUIDANCE)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        if not isinstance(negative, str) or negative.strip().lower() not in (*CONDITION_LABELS, NO_NEGATIVE):
            raise InputError("negative_condition", f"a label of {', '.join(CONDITION_LABELS)} or {NO_NEGATIVE!r}",
                             got=repr(negative)[:200])
        return temperature, scale, negative.strip().lower()

    def _draw(self, n: int, row: int, base: int, scale: float, seed: int, temperature: float) -> torch.Tensor:
        """The ``n`` draws, on the CPU: a flow prior's base noise (image i's is row i of one randn
        call, mapped per batch in :meth:`generate`), else prior samples (mean-shifted when guided
        without a flow), shaped as latents."""
        if self.prior_kind == "flow":
            return temperature * torch.randn(n, *FLOW_GRID, generator=torch.Generator().manual_seed(seed))
        z = sample_prior(self.prior, row, n, seed, temperature)
        if scale != 1.0 and self.flow is None:  # mean-shift guidance
            z = z + (scale - 1.0) * (self.prior["mean"][row] - self.prior["mean"][base])
        return z.view(n, *self.latent_shape)

    @torch.no_grad()
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
