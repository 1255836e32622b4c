"""``diffusion``: a class-conditional diffusion model built on diffusers.

Network: a diffusers ``UNet2DModel`` with a class embedding (one row per label of
:data:`hygeia.vocab.CONDITION_LABELS` plus a *null* row for classifier-free guidance).
Training: DDPM (epsilon prediction, cosine noise schedule, 1000 steps); the label is replaced by
the null class with probability ``p_uncond`` so one network gives conditional and unconditional
predictions. Sampling: DDIM (eta = 0) or DPM-Solver++ (multistep) with classifier-free guidance
``eps = eps_null + s * (eps_label - eps_null)`` computed in one batched forward pass.

Spaces (``mode``):

- ``pixel``: the 64x64 image in [-1, 1], folded into non-overlapping ``patch x patch`` pixel
  blocks (``pixel_unshuffle``: 1x64x64 -> 16x16x16 for ``patch=4``). Noise and denoising act on
  pixels, exactly as in pixel space; only the UNet sees the blocks as channels, which makes it
  about 16x cheaper than a UNet at full resolution (what CPU training allows).
- ``latent``: the 4x16x16 latent of the ``vae`` plugin's autoencoder, scaled to unit variance.

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
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from hygeia import tensors
from hygeia.api import GeneratedImage, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import CARD as CARD_FILE
from hygeia.bundles import CONFIG as CONFIG_FILE
from hygeia.bundles import WEIGHTS as WEIGHTS_FILE
from hygeia.bundles import load_bundle, pick_device, sha256_file
from hygeia.vocab import CHEST_FOV_MM as FOV_MM
from hygeia_lab.phantoms import class_conditional_set
from hygeia.errors import BundleError, InputError
from hygeia.outputs import atomic_dir
from hygeia.text import MIN_LABEL_SIMILARITY, label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CONDITION_LABELS

NAME, VERSION = "diffusion", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / NAME
SIZE = 64
PIXEL_SPACING = (FOV_MM / SIZE, FOV_MM / SIZE)
NULL_CLASS = len(CONDITION_LABELS)
"""Class index of 'no condition': unconditional samples and the guidance baseline."""
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
from a *normal* image instead of from the unconditional one (see :func:`denoise`)."""


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


def _card(metrics: dict[str, Any]) -> ModelCard:
    return ModelCard(CARD.intended_use, CARD.training_data, metrics, CARD.limitations, CARD.license)


# --------------------------------------------------------------------------- model spaces
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
            eps = unet(inp, t, class_labels=labels).sample.float()
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1)
    return x


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


def _verify(path: Path, manifest: dict[str, torch.Tensor]) -> None:
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
        from diffusers import AutoencoderKL, UNet2DModel

        self.path = Path(bundle or WEIGHTS)
        b = load_bundle(self.path)
        _verify(self.path, b.tensors)
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
        from diffusers import DDPMScheduler

        self.scheduler_config = dict(DDPMScheduler.load_config(self.path / "scheduler"))
        vae = None
        if self.config["mode"] == "latent":
            vae = AutoencoderKL.from_pretrained(self.path / "vae", low_cpu_mem_usage=False).eval().requires_grad_(False).to(self.device)
        self.space = Space(self.config["mode"], int(self.config.get("patch", 1)), vae,
                           float(self.config.get("latent_scaling", 1.0)))
        self.sample_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.labels: tuple[str, ...] = tuple(self.config["labels"])
        defaults = self.config.get("sampling", {})
        self.defaults = {"steps": int(defaults.get("steps", 50)), "guidance_scale": float(defaults.get("guidance_scale", 2.0)),
                         "sampler": str(defaults.get("sampler", "ddim")),
                         "negative_condition": str(defaults.get("negative_condition", NO_NEGATIVE))}

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
        cls = NULL_CLASS if label is None else self.labels.index(label)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        base = negative_class(negative, self.labels, cls)
        if gs == 0:  # guidance 0 = the unconditional model
            cls, gs = NULL_CLASS, 1.0
        guided = gs != 1.0 and cls != NULL_CLASS
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *self.sample_shape), generator=g)  # on CPU: the same on every device
        batches = math.ceil(n / batch_size)
        total = batches * int(steps)
        out: list[np.ndarray] = []
        for bi in range(batches):
            x = noise[bi * batch_size:(bi + 1) * batch_size].to(self.device)
            labels = torch.full((x.shape[0],), cls, dtype=torch.long, device=self.device)
            cb = (lambda s, bi=bi: progress(bi * int(steps) + s, total)) if callable(progress) else None
            x = denoise(self.unet, make_scheduler(self.scheduler_config, sampler), x, labels, int(steps), float(gs),
                        cb, self.dtype, baseline_labels=torch.full_like(labels, base))
            out.append(self.space.decode(x).cpu().numpy())
        pixels = np.concatenate(out).astype(np.float32)
        prov = {"generator": NAME, "version": VERSION, "weights_sha256": self.identity.weights_sha256,
                "condition_kind": kind, "sampler": sampler, "steps": int(steps), "guidance_scale": float(gs),
                "negative_condition": self.labels[base] if guided and base != NULL_CLASS else None,
                "mode": self.config["mode"], **text_match}
        return [GeneratedImage(np.ascontiguousarray(pixels[i]), PIXEL_SPACING, "DX", seed, label, self.identity,
                               {**prov, "index": i}) for i in range(n)]

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


# --------------------------------------------------------------------------- training
def train(
    out: str | Path = WEIGHTS,
    seed: int = 0,
    progress: bool = True,
    epochs: int = 36,
    n_per_class: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    mode: str = "latent",
    patch: int = 4,
    vae: str | Path | None = None,
    p_uncond: float = 0.1,
    ema_decay: float = 0.999,
    samples_dir: str | Path | None = None,
    cache: str | Path | None = None,
    threads: int | None = None,
    unet: dict[str, Any] | None = None,
    init: str | Path | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_condition: str = DEFAULT_NEGATIVE,
    **options: Any,
) -> Path:
    """DDPM-train the UNet and write the bundle to ``out`` (what ``hygeia train diffusion`` runs).

    ``mode="latent"`` (default, what is shipped) trains on the ``vae`` plugin's latents (``vae``:
    its bundle; default the shipped one); ``mode="pixel"`` on 4x4 pixel blocks. Reproducible
    from ``seed`` on one device and thread count. After every epoch a PNG grid (one row per
    condition label, DDIM 25 steps, EMA weights) goes to ``samples_dir`` (default
    ``runs/diffusion``). ``init``: a diffusion bundle of the same mode whose UNet weights to
    continue from (a second stage; the bundle records it).
    """
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    if options:
        raise InputError("train options", "epochs, n_per_class, batch_size, lr, mode, patch, vae, p_uncond, "
                         "ema_decay, samples_dir, cache, threads, unet, init, guidance_scale, negative_condition",
                         got=", ".join(sorted(options)))
    check_guidance_scale(guidance_scale, MAX_GUIDANCE)
    negative_class(negative_condition, tuple(CONDITION_LABELS), NULL_CLASS)  # validates it
    for name, v, lo in (("epochs", epochs, 1), ("n_per_class", n_per_class, 8), ("batch_size", batch_size, 2),
                        ("patch", patch, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(name, f"an integer >= {lo}", got=repr(v))
    if SIZE % patch:
        raise InputError("patch", f"a divisor of {SIZE}", got=patch)
    if mode not in ("pixel", "latent"):
        raise InputError("mode", "'pixel' or 'latent'", got=repr(mode))
    if not 0 <= p_uncond < 1:
        raise InputError("p_uncond", "a probability in [0, 1)", got=repr(p_uncond))
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    samples_dir = Path(samples_dir) if samples_dir else Path("runs") / NAME
    torch.manual_seed(seed)
    device = pick_device()
    images, conds = class_conditional_set(n_per_class, size=SIZE, cache=cache, progress=progress)
    ae = None
    scaling = 1.0
    vae_id: str | None = None
    if mode == "latent":
        from hygeia.plugins import get_registry

        vgen = get_registry().create("generator", "vae", **({"bundle": vae} if vae else {}))
        ae = vgen.autoencoder.to(device)
        scaling = float(vgen.scaling_factor)
        vae_id = vgen.identity.weights_sha256
        unet_cfg = {**UNET, "in_channels": ae.config.latent_channels, "out_channels": ae.config.latent_channels,
                    "sample_size": SIZE // 2 ** (len(ae.config.block_out_channels) - 1), **(unet or {})}
        sched_cfg = {**SCHEDULER, "clip_sample": False}
    else:
        unet_cfg = {**UNET, "in_channels": patch * patch, "out_channels": patch * patch, "sample_size": SIZE // patch,
                    **(unet or {})}
        sched_cfg = dict(SCHEDULER)
    space = Space(mode, patch, ae, scaling)
    x_all = torch.cat([space.encode(torch.from_numpy(images[i:i + 256]).to(device)).cpu()
                       for i in range(0, len(images), 256)])
    y_all = torch.from_numpy(conds)
    init_id: str | None = None
    if init:
        ib = load_bundle(init)
        _verify(Path(init), ib.tensors)
        if ib.config.get("mode") != mode:
            raise InputError("init", f"a diffusion bundle of mode {mode!r}", got=f"mode {ib.config.get('mode')!r}")
        model = UNet2DModel.from_pretrained(Path(init) / "unet", low_cpu_mem_usage=False).to(device).train()
        unet_cfg, init_id = dict(model.config), ib.sha256
    else:
        model = UNet2DModel(**unet_cfg).to(device).train()
    noise_sched = DDPMScheduler(**sched_cfg)
    ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.time()
    losses: list[float] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task("diffusion", total=total, info="")
        for epoch in range(epochs):
            perm = torch.randperm(len(x_all), generator=g)
            ep_loss = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x0, y = x_all[idx].to(device), y_all[idx].clone()
                y[torch.rand(len(y), generator=g) < p_uncond] = NULL_CLASS
                noise = torch.randn(x0.shape, generator=g).to(device)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=g).to(device)
                pred = model(noise_sched.add_noise(x0, noise, t), t, class_labels=y.to(device)).sample
                loss = F.mse_loss(pred, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                lr_sched.step()
                ema.step(model.parameters())
                ep_loss += float(loss.detach())
                bar.update(task, advance=1, description=f"diffusion epoch {epoch + 1}/{epochs}",
                           info=f"loss {ep_loss / (i + 1):.4f}")
                if not bar.console.is_terminal and progress and (i + 1) % 50 == 0:
                    print(f"epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch} loss {ep_loss / (i + 1):.4f} "
                          f"{(time.time() - t0) / 60:.1f} min", flush=True)
            losses.append(ep_loss / steps_per_epoch)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            _write_epoch_grid(model, sched_cfg, space, samples_dir / f"epoch_{epoch + 1:03d}.png", seed,
                              float(guidance_scale), negative_condition)
            model.train()
            ema.restore(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    config = {
        "mode": mode,
        "patch": patch if mode == "pixel" else 1,
        "latent_scaling": scaling,
        "labels": list(CONDITION_LABELS),
        "null_class": NULL_CLASS,
        "image_size": SIZE,
        "pixel_spacing_mm": list(PIXEL_SPACING),
        "sampling": {"sampler": "ddim", "steps": 25, "guidance_scale": float(guidance_scale),
                     "negative_condition": negative_condition},
        "training": {"seed": seed, "epochs": epochs, "n_per_class": n_per_class, "batch_size": batch_size, "lr": lr,
                     "p_uncond": p_uncond, "ema_decay": ema_decay, "device": str(device), "torch": torch.__version__,
                     "vae_weights_sha256": vae_id, "init_weights_sha256": init_id},
    }
    metrics = {"train_loss_last_epoch": round(losses[-1], 5), "train_minutes": round((time.time() - t0) / 60, 1)}
    write_bundle(out, model, noise_sched, ae, config, _card(metrics))
    return out


def _write_epoch_grid(unet: Any, sched_cfg: dict[str, Any], space: Space, path: Path, seed: int,
                      guidance: float = DEFAULT_GUIDANCE, negative: str = DEFAULT_NEGATIVE) -> None:
    from hygeia.outputs import write_png
    from hygeia_lab.grids import image_grid

    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn((6 * len(CONDITION_LABELS), *shape), generator=g).to(device)
    labels = torch.arange(len(CONDITION_LABELS), device=device).repeat_interleave(6)
    from diffusers import DDPMScheduler

    cfg = dict(DDPMScheduler(**sched_cfg).config)
    labs = tuple(CONDITION_LABELS)
    base = torch.tensor([negative_class(negative, labs, int(c)) for c in labels], device=device)
    x = denoise(unet, make_scheduler(cfg, "ddim"), noise, labels, 25, guidance, baseline_labels=base)
    imgs = space.decode(x).cpu().numpy()
    write_png(path, image_grid(list(imgs), ncols=6), {"Synthetic": "true",
              "Description": "SYNTHETIC: diffusion training samples, rows: " + ", ".join(CONDITION_LABELS)})


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Class-conditional diffusion (diffusers UNet2DModel, DDPM training, DDIM/DPM-Solver sampling, "
                "classifier-free guidance); 64x64 DX",
    factory=DiffusionGenerator,
    **tensors.generator("image"),
    model_card=CARD,
    train=train,
)
