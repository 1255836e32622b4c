"""``vae``: an image VAE (diffusers ``AutoencoderKL``) with a label-conditional latent prior.

Model: a small KL autoencoder (diffusers ``AutoencoderKL``, 3 levels, 16/32/64 channels, no
attention) maps a 64x64 radiograph to a ``4 x 16 x 16`` latent. It is trained as a VAE: Gaussian likelihood with a
fixed decoder noise ``recon_sigma`` plus the KL to N(0, I), so the latent space is smooth enough
both to sample from and to serve as the latent space of the ``diffusion`` plugin.

Conditional generation: after training, a prior ``p(z | c)`` is fitted to the posterior means of
each condition's training images (one per label of :data:`hygeia.vocab.CONDITION_LABELS` plus a
pooled one for ``condition=None``). The default (``prior="pca-gmm"``, shipped since session 9)
is a Gaussian mixture (``prior_components`` full-covariance components, scikit-learn) in the
label's top ``prior_pcs`` principal directions: "ex-post density estimation" (Ghosh et al. 2020).
Bundles before session 9 have a single Gaussian per label instead (``prior="gaussian"``): the
class mean, the top ``prior_rank`` principal directions with their standard deviations, and a
per-dimension residual. ``prior="flow"`` (experimental, session 10; :mod:`hygeia_vae.flow_prior`)
is a conditional normalizing flow over the whole latent instead. Sampling draws ``z ~ p(z | c)``
(noise scaled by ``temperature``) and decodes it.
Guidance (``guidance_scale`` s, ``negative_condition`` b, default from the bundle): the sample
is shifted by ``(s - 1) (mean_c - mean_b)``, i.e. drawn around ``mean_b + s (mean_c - mean_b)``,
which is what ``p(z|c)^s p(z|b)^(1-s)`` gives for two Gaussians of one covariance: the same
negative-condition guidance as the ``diffusion`` and ``gan`` plugins, on the prior (bundles of
session 9, or ``guide="mean"``). Since session 10 the shipped mixture is guided through a
conditional flow trained beside it (``guide="flow"``): a sample ``z`` is mapped to the flow's noise
under ``c`` and back under ``b`` (``z_b``, the same sample without the finding), and the guided
latent is ``z_b + s (z - z_b)``. For the experimental flow prior the same base noise is mapped
under ``c`` and ``b`` and ``z = z_b + s (z_c - z_b)``.

Training data: 64x64 phantoms, one clean condition per image (``findings=[label]``), an equal
number per label, each label drawn from its own range of training-split seeds.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import GeneratedImage, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.vocab import CHEST_FOV_MM as FOV_MM
from hygeia_lab.phantoms import class_conditional_set
from hygeia.errors import InputError
from hygeia.text import label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CONDITION_LABELS

from .flow_prior import GRID as FLOW_GRID

NAME, VERSION = "vae", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / NAME
SIZE = 64
PIXEL_SPACING = (FOV_MM / SIZE, FOV_MM / SIZE)
MAX_N = 4096
"""Most images one ``generate`` call may return (a 64x64 float32 image is 16 KiB; latents are tiny)."""
PRIORS: tuple[str, ...] = (*CONDITION_LABELS, "none")
"""Rows of the prior tensors: one per condition label, then the pooled (unconditional) prior."""
MAX_GUIDANCE = 20.0
NO_NEGATIVE = "none"
"""``negative_condition`` value that guides away from the pooled (unconditional) prior."""
GUIDES = ("flow", "mean")
"""How the trainer's mixture or Gaussian priors are guided: ``flow`` (the default since session 10:
flow-paired, with a conditional flow trained beside the prior) or ``mean`` (the mean shift)."""
PRIOR_KINDS = ("flow", "pca-gmm", "gaussian")
"""Label priors the trainer fits: ``pca-gmm`` (the default since session 9: a Gaussian mixture in
the label's top principal directions), ``gaussian`` (low-rank plus diagonal; bundles before) or
``flow`` (experimental since session 10: a conditional normalizing flow, :mod:`hygeia_vae.flow_prior`)."""
DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_TEMPERATURE = 7.0, "normal", 1.1
"""Sampling defaults the trainer records in new bundles (``config["sampling"]``); a bundle without
them samples unguided (scale 1). See docs/plugins/vae.md for the measurements."""

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

CARD = ModelCard(
    intended_use=(
        "Synthetic 64x64 chest-radiograph phantoms conditioned on a finding label, for testing "
        "pipelines and data augmentation research; the latent space of the diffusion plugin. "
        "Not for clinical use; every output is marked synthetic."
    ),
    training_data=(
        "Hygeia phantoms (hygeia_lab.phantoms.make_phantom_set, split 'train', 64x64, default difficulty): "
        "an equal number per condition label (normal + 5 findings), one finding per image."
    ),
    metrics={},
    limitations=(
        "Knows only the phantom domain at 64x64. Samples are smoother than real phantoms (a VAE "
        "decoder averages detail). Sampled by default with flow-paired guidance 7 away from 'normal' "
        "and temperature 1.1, which draws findings more conspicuously than real phantoms show them: "
        "the cnn judge sees consolidation, effusion, cardiomegaly and pneumothorax on 94-100 % of "
        "samples and nodules on about 2 in 3 (real phantoms: 92-100 %, and 1 in 2), and calls a "
        "finding on 2 'normal' samples in 3 (1 in 8 real normals). "
        "Faint nodules and thin pneumothorax lines are partly lost in the 16x16 latent. "
        "Co-occurring findings are not modelled."
    ),
)


def _card(metrics: dict[str, Any]) -> ModelCard:
    return ModelCard(CARD.intended_use, CARD.training_data, metrics, CARD.limitations, CARD.license)


def build_autoencoder(config: dict[str, Any] | None = None) -> Any:
    """A diffusers ``AutoencoderKL`` from its config (default: :data:`AUTOENCODER`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or AUTOENCODER))


# --------------------------------------------------------------------------- plugin
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
        self.latent_shape: tuple[int, int, int] = tuple(self.config["latent_shape"])  # type: ignore[assignment]
        self.prior = {k[len("prior."):]: v.float().to(self.device) for k, v in b.tensors.items()
                      if k.startswith("prior.") and not k.startswith("prior.flow.")}
        self.flow: Any = None  # the flow's network: the prior itself (kind "flow") or the mixture's guide
        prior_config = self.config.get("prior", {"kind": "gaussian"})
        self.prior_kind: str = prior_config["kind"]
        if "flow" in prior_config:
            from .flow_prior import FlowPrior

            fc = prior_config["flow"]
            flow = FlowPrior(len(PRIORS), fc["blocks"], fc["hidden"], fc["emb"])
            flow.load_state_dict({k[len("prior.flow."):]: v for k, v in b.tensors.items()
                                  if k.startswith("prior.flow.")})
            self.flow = flow.eval().requires_grad_(False).to(self.device)
        sampling = self.config.get("sampling", {})  # no key: bundles before session 9, unguided
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
        return ((self.autoencoder.decode(latents.to(self.device)).sample + 1) / 2).clamp(0, 1)

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
        unguided) and
        ``negative_condition`` (a label or ``"none"``: the pooled prior) guide the sample away from
        the negative (module docstring: flow-paired when the bundle has a guiding flow, else a
        mean shift); default: the bundle's (shipped: 7 away from ``normal``, flow-paired); the
        null condition and a condition equal to its negative are not guided.
        ``progress(done, total)`` is called after each decoded batch.
        """
        n = check_n(n, max_n=self.max_n)
        seed = check_seed(seed)
        if options:
            raise InputError("generate options", "temperature, batch_size, guidance_scale, negative_condition, "
                             "progress", got=", ".join(sorted(options)))
        kind, label, text_match = label_condition(condition, self.condition_kinds, CONDITION_LABELS, NAME)
        if temperature is None:
            temperature = self.defaults["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
            raise InputError("temperature", "a number in (0, 2]", got=repr(temperature))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", got=repr(batch_size))
        scale = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                     MAX_GUIDANCE)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        if not isinstance(negative, str) or negative.strip().lower() not in (*CONDITION_LABELS, NO_NEGATIVE):
            raise InputError("negative_condition", f"a label of {', '.join(CONDITION_LABELS)} or {NO_NEGATIVE!r}",
                             got=repr(negative)[:200])
        negative = negative.strip().lower()
        row, base = PRIORS.index(label or "none"), PRIORS.index(negative)
        if row == base or label is None or scale == 1.0:  # nothing to guide
            scale, negative = 1.0, None
        flow_prior = self.prior_kind == "flow"
        if flow_prior:  # base noise for all n first (image i's is row i of one randn call), mapped per batch below
            z = float(temperature) * torch.randn(n, *FLOW_GRID, generator=torch.Generator().manual_seed(seed))
        else:
            z = sample_prior(self.prior, row, n, seed, float(temperature))
            if scale != 1.0 and self.flow is None:  # mean-shift guidance
                z = z + (scale - 1.0) * (self.prior["mean"][row] - self.prior["mean"][base])
            z = z.view(n, *self.latent_shape)
        out: list[np.ndarray] = []
        for start in range(0, n, batch_size):
            zb = z[start:start + batch_size].to(self.device)
            if flow_prior:
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


def sample_prior(prior: dict[str, torch.Tensor], row: int, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """``n`` flat latents from prior ``row`` (noise drawn on CPU; row ``i`` of one ``randn`` call is
    image ``i``'s): the principal-subspace Gaussian mixture when the prior has one (``gmm_*``
    tensors), else the low-rank-plus-diagonal Gaussian. ``temperature`` scales the Gaussian noise
    (for the mixture: within the chosen component)."""
    g = torch.Generator().manual_seed(seed)
    if "gmm_weights" in prior:
        keys = ("mean", "basis", "gmm_weights", "gmm_means", "gmm_chol")
        mean, basis, w, mus, chol = (prior[k][row] for k in keys)
        # width a multiple of 16: torch's CPU normal sampler fills blocks of 16 values, so only then
        # is row i the same whatever n is (image i independent of how many are drawn with it)
        e = torch.randn(n, -(-(1 + basis.shape[1]) // 16) * 16, generator=g).to(mean.device)
        u = 0.5 * (1 + torch.erf(e[:, 0] / math.sqrt(2)))  # the first draw, made uniform, picks the component
        comp = torch.searchsorted(torch.cumsum(w, 0), u.contiguous()).clamp(max=w.shape[0] - 1)
        y = mus[comp] + temperature * (chol[comp] @ e[:, 1:1 + basis.shape[1], None])[..., 0]
        return mean + y @ basis.T
    mean, comps, scales, resid = (prior[k][row] for k in ("mean", "components", "scales", "residual"))
    k = scales.shape[0]
    e = torch.randn(n, k + mean.shape[0], generator=g).to(mean.device)  # row i: image i's noise
    e1, e2 = e[:, :k], e[:, k:]
    return mean + temperature * ((e1 * scales) @ comps.T + e2 * resid)


def fit_gmm_prior(latents: torch.Tensor, pcs: int, components: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Gaussian mixture (scikit-learn, full covariances) in the top ``pcs`` principal directions of
    flat latents ``[N, D]`` ("ex-post density estimation", Ghosh et al. 2020)."""
    from sklearn.mixture import GaussianMixture

    x = latents.double()
    mean = x.mean(0)
    xc = x - mean
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    basis = vh[:pcs].T  # [D, pcs]
    gm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed)
    gm.fit((xc @ basis).numpy())
    return {"mean": mean.float(), "basis": basis.float(), "gmm_weights": torch.from_numpy(gm.weights_).float(),
            "gmm_means": torch.from_numpy(gm.means_).float(),
            "gmm_chol": torch.from_numpy(np.linalg.cholesky(gm.covariances_)).float()}


def fit_prior(latents: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Low-rank-plus-diagonal Gaussian fitted to flat latents ``[N, D]``."""
    x = latents.double()
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(rank, vh.shape[0])
    scales = s[:k] / math.sqrt(max(x.shape[0] - 1, 1))
    comps = vh[:k].T  # [D, k]
    explained = (comps * scales).pow(2).sum(1)
    resid = (xc.var(0) - explained).clamp_min(1e-8).sqrt()
    if k < rank:  # fewer samples than the rank: pad with zero-variance directions
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], rank - k)], 1)
        scales = torch.cat([scales, scales.new_zeros(rank - k)])
    return {"mean": mean.float(), "components": comps.float(), "scales": scales.float(), "residual": resid.float()}


# --------------------------------------------------------------------------- training
def train(
    out: str | Path = WEIGHTS,
    seed: int = 0,
    progress: bool = True,
    epochs: int = 6,
    n_per_class: int = 3000,
    batch_size: int = 16,
    lr: float = 2e-3,
    recon_sigma: float = 0.01,
    prior_rank: int = 48,
    prior: str = "pca-gmm",
    prior_pcs: int = 96,
    prior_components: int = 30,
    prior_epochs: int = 40,
    prior_blocks: int = 12,
    prior_hidden: int = 96,
    prior_noise: float = 0.25,
    guide: str = "flow",
    autoencoder_from: str | Path | None = None,
    n_val: int = 256,
    samples_dir: str | Path | None = None,
    cache: str | Path | None = None,
    threads: int | None = None,
    block_out_channels: list[int] | tuple[int, ...] | None = None,
    attention: bool | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_condition: str = DEFAULT_NEGATIVE,
    temperature: float = DEFAULT_TEMPERATURE,
    **options: Any,
) -> Path:
    """Train the VAE and fit its label priors; write the bundle to ``out`` (what ``hygeia train vae`` runs).

    Reproducible from ``seed`` on one device and thread count. A PNG grid of samples (one row
    per condition) is written to ``samples_dir`` (default ``runs/vae``) after every epoch.
    ``guidance_scale``, ``negative_condition`` and ``temperature``: the sampling defaults recorded
    in the bundle (they do not change training). ``prior``: ``pca-gmm`` (a Gaussian mixture of
    ``prior_components`` full-covariance components in each label's top ``prior_pcs`` principal
    directions), ``gaussian`` (rank ``prior_rank`` plus a diagonal residual) or ``flow`` (experimental:
    a conditional Glow of ``prior_blocks`` blocks and ``prior_hidden`` channels trained for
    ``prior_epochs`` on posterior samples with their noise scaled by ``prior_noise``).
    ``guide``: how a ``pca-gmm`` or ``gaussian`` prior is guided: ``flow`` (the default since
    session 10; trains the same conditional flow beside it) or ``mean`` (the mean shift).
    ``autoencoder_from``: a trained vae bundle whose autoencoder is reused (no autoencoder epochs;
    only the priors are fitted).
    """
    if options:
        raise InputError("train options", "epochs, n_per_class, batch_size, lr, recon_sigma, prior_rank, n_val, "
                         "samples_dir, cache, threads, block_out_channels, attention, guidance_scale, "
                         "negative_condition, temperature, prior, prior_pcs, prior_components, prior_epochs, "
                         "prior_blocks, prior_hidden, prior_noise, guide, autoencoder_from",
                         got=", ".join(sorted(options)))
    check_guidance_scale(guidance_scale, MAX_GUIDANCE)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise InputError("temperature", "a number in (0, 2]", got=repr(temperature))
    if prior not in PRIOR_KINDS:
        raise InputError("prior", " or ".join(PRIOR_KINDS), got=repr(prior))
    if guide not in GUIDES:
        raise InputError("guide", " or ".join(GUIDES) + " (how a mixture or Gaussian prior is guided)", got=repr(guide))
    if not isinstance(negative_condition, str) or negative_condition not in PRIORS:
        raise InputError("negative_condition", f"a label of {', '.join(CONDITION_LABELS)} or {NO_NEGATIVE!r}",
                         got=repr(negative_condition))
    arch = dict(AUTOENCODER)
    if block_out_channels is not None:
        if (not isinstance(block_out_channels, (list, tuple)) or len(block_out_channels) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 8 and c % 8 == 0
                           for c in block_out_channels)):
            raise InputError("block_out_channels", "3 multiples of 8 (one per level, 64 -> 32 -> 16 px)",
                             got=repr(block_out_channels))
        arch["block_out_channels"] = [int(c) for c in block_out_channels]
    if attention is not None:
        if not isinstance(attention, bool):
            raise InputError("attention", "true or false (self-attention in the 16x16 mid block)", got=repr(attention))
        arch["mid_block_add_attention"] = attention
    for name, v, lo in (("epochs", epochs, 1), ("n_per_class", n_per_class, 8), ("batch_size", batch_size, 2),
                        ("prior_rank", prior_rank, 1), ("n_val", n_val, 1), ("prior_pcs", prior_pcs, 1),
                        ("prior_components", prior_components, 1), ("prior_epochs", prior_epochs, 1),
                        ("prior_blocks", prior_blocks, 1), ("prior_hidden", prior_hidden, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(name, f"an integer >= {lo}", got=repr(v))
    if isinstance(prior_noise, bool) or not isinstance(prior_noise, (int, float)) or not 0 <= prior_noise <= 1:
        raise InputError("prior_noise", "a number in [0, 1] (the posterior noise the flow prior is trained on)",
                         got=repr(prior_noise))
    source = None
    if autoencoder_from is not None:  # reuse a trained bundle's autoencoder: only the priors are fitted
        try:
            source = load_bundle(autoencoder_from)
        except Exception as e:
            raise InputError("autoencoder_from", "a vae bundle folder", got=f"{autoencoder_from} ({e})") from e
        if "autoencoder" not in source.config:
            raise InputError("autoencoder_from", "a vae bundle (config.json has no 'autoencoder')",
                             got=str(autoencoder_from))
        arch = {k: v for k, v in source.config["autoencoder"].items() if k != "scaling_factor"}
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    samples_dir = Path(samples_dir) if samples_dir else Path("runs") / NAME
    torch.manual_seed(seed)
    device = pick_device()
    images, conds = class_conditional_set(n_per_class, size=SIZE, cache=cache, progress=progress)
    x_all = torch.from_numpy(images)
    ae = build_autoencoder(arch).to(device).train()
    if source is not None:
        ae.load_state_dict({k[len("autoencoder."):]: v for k, v in source.tensors.items()
                            if k.startswith("autoencoder.")})
        epochs = 0
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    w_rec = 1.0 / (2 * recon_sigma ** 2)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.time()
    log: dict[str, float] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task("vae", total=total, info="")
        for epoch in range(epochs):
            perm = torch.randperm(len(x_all), generator=g)
            rec_sum = kl_sum = 0.0
            for i in range(steps_per_epoch):
                xb = x_all[perm[i * batch_size:(i + 1) * batch_size]].to(device) * 2 - 1
                post = ae.encode(xb).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
                rec = ae.decode(z).sample
                # per-image negative ELBO: Gaussian NLL (fixed sigma, on the [0, 1] scale) + KL
                mse = ((rec - xb) / 2).pow(2).flatten(1).sum(1)
                kl = post.kl()
                loss = (w_rec * mse + kl).mean() / xb[0].numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
                opt.step()
                sched.step()
                rec_sum += float(mse.detach().mean()) / xb[0].numel()
                kl_sum += float(kl.detach().mean())
                bar.update(task, advance=1, description=f"vae epoch {epoch + 1}/{epochs}",
                           info=f"mse {rec_sum / (i + 1):.5f} kl {kl_sum / (i + 1):.0f}")
                if progress and not bar.console.is_terminal and (i + 1) % 50 == 0:  # a log line when piped
                    print(f"epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch} mse {rec_sum / (i + 1):.5f} "
                          f"kl {kl_sum / (i + 1):.0f} {(time.time() - t0) / 60:.1f} min", flush=True)
            log = {"train_mse": rec_sum / steps_per_epoch, "train_kl": kl_sum / steps_per_epoch}
            ae.eval()
            _write_epoch_grid(ae, x_all, conds, samples_dir / f"epoch_{epoch + 1:03d}.png", prior_rank, seed)
            ae.train()
    ae.eval()
    # latent statistics, the label priors and held-out reconstruction error
    with torch.no_grad():
        posts = [ae.encode(x_all[i:i + 256].to(device) * 2 - 1).latent_dist for i in range(0, len(x_all), 256)]
    mu, sd = torch.cat([p.mean.cpu() for p in posts]), torch.cat([p.std.cpu() for p in posts])
    del posts
    scaling = float(1.0 / mu.std())
    ae.register_to_config(scaling_factor=scaling)
    prior_config: dict[str, Any] = {"kind": prior}
    if prior != "flow":
        priors = _fit_priors(mu.flatten(1), torch.from_numpy(conds), prior_rank, prior, prior_pcs, prior_components,
                             seed)
        if prior == "pca-gmm":
            prior_config.update(pcs=prior_pcs, components=prior_components)
        prior_config["guidance"] = guide
    if prior == "flow" or guide == "flow":
        from .flow_prior import train_flow_prior

        def report(epoch: int, total_epochs: int, nll: float) -> None:
            if progress:
                print(f"flow prior epoch {epoch}/{total_epochs} nll/dim {nll:.4f} {(time.time() - t0) / 60:.1f} min",
                      flush=True)

        flow, flow_log = train_flow_prior((mu * scaling).to(device), (sd * scaling * prior_noise).to(device),
                                          torch.from_numpy(conds).to(device), len(PRIORS), PRIORS.index(NO_NEGATIVE),
                                          epochs=prior_epochs, seed=seed, blocks=prior_blocks, hidden=prior_hidden,
                                          report=report)
        log.update(flow_log)
        if prior == "flow":
            flat, rows = mu.flatten(1), torch.from_numpy(conds)
            priors = {"mean": torch.stack([flat[rows == k].mean(0) for k in range(len(CONDITION_LABELS))]
                                          + [flat.mean(0)])}
        priors.update({f"flow.{k}": v.detach().cpu() for k, v in flow.state_dict().items()})
        prior_config["flow"] = {**flow.config, "epochs": prior_epochs, "noise": float(prior_noise)}
    from hygeia_lab import make_phantom_set

    val = torch.from_numpy(make_phantom_set(n_val, split="val", size=SIZE).images)
    with torch.no_grad():
        r = (ae.decode(ae.encode(val.to(device) * 2 - 1).latent_dist.mean).sample.cpu() + 1) / 2
    val_mse = float((r.clamp(0, 1) - val).pow(2).mean())
    metrics = {**{k: round(v, 6) for k, v in log.items()}, "val_reconstruction_mse": round(val_mse, 6),
               "val_reconstruction_psnr_db": round(10 * math.log10(1.0 / max(val_mse, 1e-12)), 2),
               "train_minutes": round((time.time() - t0) / 60, 1)}
    tensors = {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}
    tensors.update({f"prior.{k}": v for k, v in priors.items()})
    config = {
        "autoencoder": {**arch, "scaling_factor": scaling},
        "latent_shape": list(mu.shape[1:]),
        "priors": list(PRIORS),
        "prior_rank": prior_rank,
        "prior": prior_config,
        "image_size": SIZE,
        "pixel_spacing_mm": list(PIXEL_SPACING),
        "sampling": {"guidance_scale": float(guidance_scale), "negative_condition": negative_condition,
                     "temperature": float(temperature)},
        "training": {"seed": seed, "epochs": epochs, "n_per_class": n_per_class, "batch_size": batch_size, "lr": lr,
                     "recon_sigma": recon_sigma, "device": str(device), "torch": torch.__version__,
                     **({"autoencoder_from": {"weights_sha256": source.sha256,
                                              "training": source.config.get("training", {})}} if source else {})},
    }
    save_bundle(out, tensors, config, _card(metrics))
    return out


def _fit_priors(flat: torch.Tensor, conds: torch.Tensor, rank: int, kind: str = "gaussian", pcs: int = 96,
                components: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prior per label, then the pooled one (rows of :data:`PRIORS`)."""
    groups = [flat[conds == k] for k in range(len(CONDITION_LABELS))] + [flat]
    if kind == "pca-gmm":  # one shape for every row: bounded by the smallest group (tiny test runs)
        smallest = min(len(x) for x in groups)
        k, m = max(1, min(pcs, smallest // 2)), max(1, min(components, smallest // 4))
        parts = [fit_gmm_prior(x, k, m, seed) for x in groups]
    else:
        parts = [fit_prior(x, rank) for x in groups]
    return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


def _write_epoch_grid(ae: Any, x_all: torch.Tensor, conds: np.ndarray, path: Path, rank: int, seed: int) -> None:
    """Samples from priors fitted on 128 images per label: one row of 8 per condition label."""
    from hygeia.outputs import write_png
    from hygeia_lab.grids import image_grid

    device = next(ae.parameters()).device
    idx = np.concatenate([np.flatnonzero(conds == k)[:128] for k in range(len(CONDITION_LABELS))])
    with torch.no_grad():
        mu = ae.encode(x_all[idx].to(device) * 2 - 1).latent_dist.mean.cpu()
        prior = _fit_priors(mu.flatten(1), torch.from_numpy(conds[idx]), min(rank, 32))
        rows = []
        for k in range(len(CONDITION_LABELS)):
            z = sample_prior(prior, k, 8, seed).view(8, *mu.shape[1:])
            rows.append(((ae.decode(z.to(device)).sample.cpu() + 1) / 2).clamp(0, 1).numpy())
    write_png(path, image_grid(list(np.concatenate(rows)), ncols=8), {"Synthetic": "true",
              "Description": "SYNTHETIC: vae training samples, rows: " + ", ".join(CONDITION_LABELS)})


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Image VAE (diffusers AutoencoderKL, 4x16x16 latent) with a label-conditional latent prior "
                "(a Gaussian mixture per label, guided through a conditional flow); 64x64 DX",
    factory=ImageVAE,
    **tensors.generator("image"),
    model_card=CARD,
    train=train,
)
