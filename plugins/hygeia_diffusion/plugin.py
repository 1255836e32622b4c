"""The ``diffusion`` generator: class-conditional diffusion built on diffusers (64x64 phantoms).

The plugin class :class:`DiffusionGenerator`, its bundle (reading, verifying, writing), the model
card and :data:`SPEC`. Network, spaces and sampler: :mod:`hygeia_diffusion.model`; ``generate``
itself (checks, conditions, guidance, provenance), shared with the frozen runner:
:mod:`hygeia_diffusion._sampling`; serving without torch: :mod:`hygeia_diffusion._freeze` and
:mod:`hygeia_diffusion._frozen`; trainer (``hygeia train diffusion``): :mod:`hygeia_diffusion.train`,
which the spec names and which only training imports.

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
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import CARD as CARD_FILE
from hygeia.bundles import CONFIG as CONFIG_FILE
from hygeia.bundles import WEIGHTS as WEIGHTS_FILE
from hygeia.bundles import load_bundle, pick_device, sha256_file
from hygeia.errors import BundleError, InputError
from hygeia.outputs import atomic_dir

from ._sampling import NAME, VERSION, Sampling, sampling_defaults
from .model import Space, denoise, make_scheduler

WEIGHTS = Path(__file__).parent / "weights" / NAME
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
class DiffusionGenerator(Sampling):
    """Class-conditional diffusion: ``generate(n, condition="effusion", seed=0, steps=50, guidance_scale=2)``.

    ``bundle``: another trained bundle than the shipped one; ``device``: ``"cpu"``, ``"cuda"`` or
    None (CUDA when available); ``dtype``: ``"float32"`` (default) or ``"bfloat16"`` (autocast of
    the UNet; slower on CPU, meant for recent GPUs); ``compile``: ``torch.compile`` the UNet
    (a one-time compilation on the first call, then faster sampling: for long-lived servers).
    """

    freeze_probes = [{"sampler": "dpm", "steps": 8, "negative_condition": "none"}]
    """Options :func:`hygeia.frozen.check_generator` also compares the frozen runner on."""

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
        self.defaults = sampling_defaults(self.config)

    def export_module(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]] | None:
        """The UNet and how the sampler calls it (a noisy batch, int64 timesteps and class labels,
        one per row), for compiled execution (:mod:`hygeia.compiled`); None after ``compile=True``
        (``torch.compile`` already owns it)."""
        from diffusers import UNet2DModel

        if not isinstance(self.unet, UNet2DModel):
            return None
        return self.unet, (torch.zeros(1, *self.sample_shape), torch.full((1,), 500), torch.zeros(1, dtype=torch.long))

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

    def freeze(self, folder: Path) -> str:
        """Save this model's sampling for serving without torch (:mod:`hygeia.frozen`): the UNet and
        the latent decoder as ONNX graphs, the text encoder for free-text conditions; returns the
        runner, :class:`~hygeia_diffusion._frozen.FrozenDiffusion`."""
        from ._freeze import freeze

        return freeze(self, Path(folder))

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
