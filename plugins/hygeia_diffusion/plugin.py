"""The ``diffusion`` generator: class-conditional diffusion built on diffusers (64x64 phantoms).

The plugin class :class:`DiffusionGenerator`, its bundle (reading, verifying, writing), the model
card and :data:`SPEC`. Network, spaces and sampler: :mod:`hygeia_diffusion.model`; trainer
(``hygeia train diffusion``): :mod:`hygeia_diffusion.train`, which the spec names and which only
training imports.

Bundle (one folder, diffusers ``save_pretrained`` layout inside)::

    BUNDLE/
      unet/        config.json + diffusion_pytorch_model.safetensors   (UNet2DModel)
      scheduler/   scheduler_config.json                               (DDPMScheduler)
      vae/         config.json + diffusion_pytorch_model.safetensors   (latent mode only)
      config.json       mode, patch, labels, sampling defaults, training record
      model_card.json   intended use, training data, metrics, limits
      model.safetensors manifest: the SHA-256 of each component's weights (uint8 [32] each),
                        so the bundle's identity (the SHA-256 of this file) covers every weight
                        and a changed component file is detected at load time.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import GeneratedImage, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import CARD as CARD_FILE
from hygeia.bundles import CONFIG as CONFIG_FILE
from hygeia.bundles import WEIGHTS as WEIGHTS_FILE
from hygeia.bundles import load_bundle, pick_device, sha256_file
from hygeia.errors import BundleError, InputError
from hygeia.outputs import atomic_dir
from hygeia.text import MIN_LABEL_SIMILARITY, label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CHEST_FOV_MM as FOV_MM

from .model import NULL_CLASS, SIZE, Space, denoise, make_scheduler

NAME, VERSION = "diffusion", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / NAME
PIXEL_SPACING = (FOV_MM / SIZE, FOV_MM / SIZE)
MAX_N = 1024
"""Most images per ``generate`` call (the whole batch's noise and results are held in memory)."""
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
DEFAULT_GUIDANCE = 5.0
"""Guidance scale recorded as the bundle's sampling default (``hygeia evaluate generator``, shipped
weights, plain guidance: 2 -> 0.678, 3.5 -> 0.814, 5 -> 0.841 conditional accuracy; with the negative
condition ``normal``: 3 -> 0.856, 4 -> 0.890, 5 -> 0.916; see docs/plugins/diffusion.md)."""
SAMPLERS = ("ddim", "dpm")
NO_NEGATIVE = "none"
"""``negative_condition`` value for plain classifier-free guidance (the null class as baseline)."""
DEFAULT_NEGATIVE = "normal"
"""Negative condition recorded as the sampling default of new bundles: each finding is guided away
from a *normal* image instead of from the unconditional one (see :func:`hygeia_diffusion.model.denoise`)."""


def negative_class(negative: Any, labels: tuple[str, ...], cls: int) -> int:
    """The guidance baseline class of condition ``cls`` for the ``negative_condition`` option.

    ``negative``: a label of ``labels`` or ``"none"``/``""`` (the null class: plain classifier-free
    guidance); InputError otherwise. A condition is never guided away from itself (``normal`` with
    the negative ``normal`` uses the null class).
    """
    if negative in ("", NO_NEGATIVE):
        return NULL_CLASS
    if not isinstance(negative, str) or negative not in labels:
        raise InputError("negative_condition", f"one of {', '.join(labels)} or '{NO_NEGATIVE}'", got=repr(negative))
    base = labels.index(negative)
    return NULL_CLASS if base == cls else base


COMPONENTS = ("unet", "scheduler", "vae")
_WEIGHT_FILE = "diffusion_pytorch_model.safetensors"

CARD = ModelCard(
    intended_use=(
        "Synthetic 64x64 chest-radiograph phantoms conditioned on a finding label, for testing "
        "pipelines and data augmentation research. Not for clinical use; every output is marked synthetic."
    ),
    training_data=(
        "Hygeia phantoms (hygeia_lab.phantoms.make_phantom_set, split 'train', 64x64, default difficulty): "
        "an equal number per condition label (normal + 5 findings), one finding per image."
    ),
    metrics={},
    limitations=(
        "Knows only the phantom domain at 64x64 and one finding per image (co-occurring findings "
        "are not modelled). Trained briefly on CPU: samples are noisier than real phantoms, and the "
        "smallest findings (faint nodules, thin pneumothorax lines) are the least faithful."
    ),
)


def card_with_metrics(metrics: dict[str, Any]) -> ModelCard:
    """:data:`CARD` with a trained bundle's metrics."""
    return ModelCard(CARD.intended_use, CARD.training_data, metrics, CARD.limitations, CARD.license)


# --------------------------------------------------------------------------- bundles
def write_bundle(path: str | Path, unet: Any, scheduler: Any, vae: Any | None, config: dict[str, Any],
                 card: ModelCard) -> str:
    """Write a diffusion bundle atomically (temporary sibling folder, then rename); return its SHA-256."""
    def fill(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        _finish(tmp, config, card)

    return _atomic_dir(Path(path), fill)


def _finish(tmp: Path, config: dict[str, Any], card: ModelCard) -> None:
    from safetensors.torch import save_file

    manifest = {}
    for comp in ("unet", "vae"):
        f = tmp / comp / _WEIGHT_FILE
        if f.is_file():
            manifest[f"sha256.{comp}"] = torch.tensor(list(bytes.fromhex(sha256_file(f))), dtype=torch.uint8)
    save_file(manifest, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")


def _atomic_dir(path: Path, fill: Callable[[Path], None]) -> str:
    with atomic_dir(path) as tmp:
        fill(tmp)
    return sha256_file(path / WEIGHTS_FILE)


def verify_bundle(path: Path, manifest: dict[str, torch.Tensor]) -> None:
    """BundleError when a component's weights file is missing or does not match the manifest."""
    for key, digest in manifest.items():
        comp = key.split(".", 1)[1]
        f = path / comp / _WEIGHT_FILE
        if not f.is_file():
            raise BundleError(f"diffusion bundle {path}: missing {comp}/{_WEIGHT_FILE}")
        if sha256_file(f) != bytes(digest.tolist()).hex():
            raise BundleError(f"diffusion bundle {path}: {comp}/{_WEIGHT_FILE} does not match the manifest "
                              f"in {WEIGHTS_FILE} (changed or corrupt)")


# --------------------------------------------------------------------------- plugin
class DiffusionGenerator:
    """Class-conditional diffusion: ``generate(n, condition="effusion", seed=0, steps=50, guidance_scale=2)``.

    ``bundle``: another trained bundle than the shipped one; ``device``: ``"cpu"``, ``"cuda"`` or
    None (CUDA when available); ``dtype``: ``"float32"`` (default) or ``"bfloat16"`` (autocast of
    the UNet; slower on CPU, meant for recent GPUs); ``compile``: ``torch.compile`` the UNet
    (a one-time compilation on the first call, then faster sampling: for long-lived servers).
    """

    output = "image"
    condition_kinds = frozenset({"none", "label", "text"})
    max_n = MAX_N
    min_text_similarity = MIN_LABEL_SIMILARITY
    """A free-text condition whose best cosine similarity to every label's phrases is below this is rejected."""

    def __init__(self, bundle: str | Path | None = None, device: str | None = None, dtype: str = "float32",
                 compile: bool = False) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

        self.path = Path(bundle or WEIGHTS)
        b = load_bundle(self.path)
        verify_bundle(self.path, b.tensors)
        self.config: dict[str, Any] = b.config
        self.card = b.card
        self.identity = ModelIdentity(NAME, VERSION, "generator", b.sha256)
        self.device = pick_device(device)
        if dtype not in ("float32", "bfloat16"):
            raise InputError("dtype", "'float32' or 'bfloat16'", got=repr(dtype))
        self.dtype = None if dtype == "float32" else torch.bfloat16
        unet = UNet2DModel.from_pretrained(self.path / "unet", low_cpu_mem_usage=False).eval().requires_grad_(False)
        # channels_last weights: measured faster on CPU (benchmarks/generation_diffusion.py), standard on CUDA
        self.unet = unet.to(self.device).to(memory_format=torch.channels_last)
        if compile:  # one-time compilation on the first call; worth it for long-lived servers
            self.unet = torch.compile(self.unet)
        self.scheduler_config = dict(DDPMScheduler.load_config(self.path / "scheduler"))
        vae = None
        if self.config["mode"] == "latent":
            vae = AutoencoderKL.from_pretrained(self.path / "vae", low_cpu_mem_usage=False)
            vae = vae.eval().requires_grad_(False).to(self.device)
        self.space = Space(self.config["mode"], int(self.config.get("patch", 1)), vae,
                           float(self.config.get("latent_scaling", 1.0)))
        self.sample_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.labels: tuple[str, ...] = tuple(self.config["labels"])
        defaults = self.config.get("sampling", {})
        self.defaults = {"steps": int(defaults.get("steps", 50)), "guidance_scale": float(defaults.get("guidance_scale", 2.0)),
                         "sampler": str(defaults.get("sampler", "ddim")),
                         "negative_condition": str(defaults.get("negative_condition", NO_NEGATIVE))}

    def export_module(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]] | None:
        """The UNet and how the sampler calls it (a noisy batch, int64 timesteps and class labels,
        one per row), for compiled execution (:mod:`hygeia.compiled`); None after ``compile=True``
        (``torch.compile`` already owns it)."""
        from diffusers import UNet2DModel

        if not isinstance(self.unet, UNet2DModel):
            return None
        return self.unet, (torch.zeros(1, *self.sample_shape), torch.full((1,), 500), torch.zeros(1, dtype=torch.long))

    def generate(
        self,
        n: int,
        condition: Any = None,
        seed: int = 0,
        progress: Callable[[int, int], Any] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        batch_size: int = 64,
        negative_condition: str | None = None,
        **options: Any,
    ) -> list[GeneratedImage]:
        """``n`` images for ``condition`` (a finding label, or None), reproducible from ``seed``.

        ``steps`` in [1, 1000] (default from the bundle: 25); ``guidance_scale`` in [0, 20]
        (1: no guidance, 0: unconditional); ``sampler`` ``ddim`` or ``dpm``;
        ``negative_condition``: the label guidance steers away from, or ``"none"`` for the
        unconditional baseline (default from the bundle: ``normal``, so a finding is contrasted
        with a normal image; ``normal`` itself always uses the unconditional baseline);
        ``progress(done, total)`` is called after every denoising step of every batch
        (``None``/``False``: none).
        """
        n = check_n(n, max_n=self.max_n)
        seed = check_seed(seed)
        if options:
            raise InputError("generate options", "steps, guidance_scale, sampler, batch_size, negative_condition, progress",
                             got=", ".join(sorted(options)))
        kind, label, text_match = label_condition(condition, self.condition_kinds, self.labels, NAME,
                                                  self.min_text_similarity)
        steps, gs, sampler = self._sampling_options(steps, guidance_scale, sampler, batch_size)
        cls = NULL_CLASS if label is None else self.labels.index(label)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        base = negative_class(negative, self.labels, cls)
        if gs == 0:  # guidance 0 = the unconditional model
            cls, gs = NULL_CLASS, 1.0
        guided = gs != 1.0 and cls != NULL_CLASS
        pixels = self._sample(n, seed, cls, base, steps, gs, sampler, batch_size, progress)
        prov = {"generator": NAME, "version": VERSION, "weights_sha256": self.identity.weights_sha256,
                "condition_kind": kind, "sampler": sampler, "steps": steps, "guidance_scale": float(gs),
                "negative_condition": self.labels[base] if guided and base != NULL_CLASS else None,
                "mode": self.config["mode"], **text_match}
        return [GeneratedImage(np.ascontiguousarray(pixels[i]), PIXEL_SPACING, "DX", seed, label, self.identity,
                               {**prov, "index": i}) for i in range(n)]

    def _sampling_options(self, steps: Any, guidance_scale: Any, sampler: Any,
                          batch_size: Any) -> tuple[int, float, str]:
        """``(steps, guidance scale, sampler)`` with the bundle's defaults filled in; InputError for a
        value out of range (``batch_size`` too)."""
        steps = self.defaults["steps"] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise InputError("steps", f"an integer in [1, {MAX_STEPS}]", got=repr(steps))
        gs = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                  MAX_GUIDANCE)
        sampler = self.defaults["sampler"] if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise InputError("sampler", f"one of {', '.join(SAMPLERS)}", got=repr(sampler))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", got=repr(batch_size))
        return int(steps), gs, sampler

    def _sample(self, n: int, seed: int, cls: int, base: int, steps: int, gs: float, sampler: str,
                batch_size: int, progress: Callable[[int, int], Any] | None) -> np.ndarray:
        """``float32 [n, 1, 64, 64]`` images of class ``cls`` guided away from class ``base``, batch by batch."""
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *self.sample_shape), generator=g)  # on CPU: the same on every device
        batches = math.ceil(n / batch_size)
        total = batches * steps
        out: list[np.ndarray] = []
        for bi in range(batches):
            x = noise[bi * batch_size:(bi + 1) * batch_size].to(self.device)
            labels = torch.full((x.shape[0],), cls, dtype=torch.long, device=self.device)
            cb = (lambda s, bi=bi: progress(bi * steps + s, total)) if callable(progress) else None
            x = denoise(self.unet, make_scheduler(self.scheduler_config, sampler), x, labels, steps, float(gs),
                        cb, self.dtype, baseline_labels=torch.full_like(labels, base))
            out.append(self.space.decode(x).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def label_for_text(self, text: str) -> tuple[str, float]:
        """The label a free-text condition asks for, and its cosine similarity
        (:func:`hygeia.text.label_for_text`: the closest label's phrases; rejected below
        :attr:`min_text_similarity`; negation is not understood)."""
        from hygeia.text import label_for_text

        return label_for_text(text, self.labels, NAME, self.min_text_similarity)

    def save(self, path: str | Path) -> str:
        """Copy this model's bundle to ``path`` (byte for byte, atomically); returns its SHA-256."""
        src = self.path

        def fill(tmp: Path) -> None:
            for comp in COMPONENTS:
                if (src / comp).is_dir():
                    shutil.copytree(src / comp, tmp / comp)
            for f in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
                shutil.copy2(src / f, tmp / f)

        return _atomic_dir(Path(path), fill)


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Class-conditional diffusion (diffusers UNet2DModel, DDPM training, DDIM/DPM-Solver sampling, "
                "classifier-free guidance); 64x64 DX",
    factory=DiffusionGenerator,
    **tensors.generator("image"),
    model_card=CARD,
    train="hygeia_diffusion.train:train",
)
