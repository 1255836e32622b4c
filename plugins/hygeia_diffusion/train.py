"""Training of the ``diffusion`` generator (what ``hygeia train diffusion`` runs).

DDPM: epsilon prediction, cosine noise schedule, 1000 steps (:data:`hygeia_diffusion.model.SCHEDULER`);
the label is replaced by the null class with probability ``p_uncond`` so one network gives
conditional and unconditional predictions. AdamW with a one-cycle learning rate, gradient
clipping at 1, an EMA of the weights (shipped instead of the raw ones). Data: phantoms with one
condition each (:func:`hygeia_lab.phantoms.class_conditional_set`), encoded once into the
diffusion space (the ``vae`` plugin's latent in latent mode). Everything random is drawn from
``seed``: the same seed gives the same weights on one device and thread count.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hygeia.bundles import load_bundle, pick_device
from hygeia.errors import InputError
from hygeia.validation import check_guidance_scale
from hygeia.vocab import CONDITION_LABELS
from hygeia_lab.phantoms import class_conditional_set

from .model import NULL_CLASS, SCHEDULER, SIZE, UNET, Space, denoise, make_scheduler
from ._sampling import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, MAX_GUIDANCE, NAME, PIXEL_SPACING, negative_class
from .plugin import WEIGHTS, card_with_metrics, verify_bundle, write_bundle


def train(
    out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True,
    epochs: int = 36, n_per_class: int = 3000, batch_size: int = 64, lr: float = 1e-3,
    mode: str = "latent", patch: int = 4, vae: str | Path | None = None, p_uncond: float = 0.1,
    ema_decay: float = 0.999, samples_dir: str | Path | None = None, cache: str | Path | None = None,
    threads: int | None = None, unet: dict[str, Any] | None = None, init: str | Path | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE, negative_condition: str = DEFAULT_NEGATIVE, **options: Any,
) -> Path:
    """DDPM-train the UNet and write the bundle to ``out`` (what ``hygeia train diffusion`` runs).

    ``mode="latent"`` (default, what is shipped) trains on the ``vae`` plugin's latents (``vae``:
    its bundle; default the shipped one); ``mode="pixel"`` on 4x4 pixel blocks. Reproducible
    from ``seed`` on one device and thread count. After every epoch a PNG grid (one row per
    condition label, DDIM 25 steps, EMA weights) goes to ``samples_dir`` (default
    ``runs/diffusion``). ``init``: a diffusion bundle of the same mode whose UNet weights to
    continue from (a second stage; the bundle records it).
    """
    from diffusers import DDPMScheduler

    _check_options(options, epochs=epochs, n_per_class=n_per_class, batch_size=batch_size, patch=patch, mode=mode,
                   p_uncond=p_uncond, guidance_scale=guidance_scale, negative_condition=negative_condition)
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    samples_dir = Path(samples_dir) if samples_dir else Path("runs") / NAME
    torch.manual_seed(seed)
    device = pick_device()
    images, conds = class_conditional_set(n_per_class, size=SIZE, cache=cache, progress=progress)
    space, vae_id, unet_cfg, sched_cfg = _space(mode, patch, vae, unet, device)
    x_all = torch.cat([space.encode(torch.from_numpy(images[i:i + 256]).to(device)).cpu()
                       for i in range(0, len(images), 256)])
    y_all = torch.from_numpy(conds)
    model, unet_cfg, init_id = _unet(init, mode, unet_cfg, device)
    noise_sched = DDPMScheduler(**sched_cfg)
    t0 = time.time()
    losses = _fit(model, noise_sched, x_all, y_all, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                  p_uncond=p_uncond, ema_decay=ema_decay, progress=progress,
                  grid=lambda net, epoch: _write_epoch_grid(net, sched_cfg, space,
                                                            samples_dir / f"epoch_{epoch:03d}.png", seed,
                                                            float(guidance_scale), negative_condition))
    config = {
        "mode": mode,
        "patch": patch if mode == "pixel" else 1,
        "latent_scaling": space.scaling,
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
    write_bundle(out, model, noise_sched, space.vae, config, card_with_metrics(metrics))
    return out


def _check_options(options: dict[str, Any], *, epochs: Any, n_per_class: Any, batch_size: Any, patch: Any,
                   mode: Any, p_uncond: Any, guidance_scale: Any, negative_condition: Any) -> None:
    """InputError for an unknown option or a value out of range, before any work."""
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


def _space(mode: str, patch: int, vae: str | Path | None, unet: dict[str, Any] | None,
           device: torch.device) -> tuple[Space, str | None, dict[str, Any], dict[str, Any]]:
    """The diffusion space, the vae bundle's SHA-256 (latent mode), and the UNet and scheduler configs.

    Latent mode loads the ``vae`` plugin (``vae``: its bundle, default the shipped one), or, when
    ``vae`` is a latent-mode diffusion bundle, that bundle's own autoencoder (``vae/``) and scaling
    factor, and records the vae bundle SHA-256 that bundle was trained on; the UNet's channels and
    sample size follow the latent, and samples are not clipped.
    """
    if mode == "latent":
        ae, scaling, vae_id = _autoencoder(vae, device)
        unet_cfg = {**UNET, "in_channels": ae.config.latent_channels, "out_channels": ae.config.latent_channels,
                    "sample_size": SIZE // 2 ** (len(ae.config.block_out_channels) - 1), **(unet or {})}
        return Space(mode, patch, ae, scaling), vae_id, unet_cfg, {**SCHEDULER, "clip_sample": False}
    unet_cfg = {**UNET, "in_channels": patch * patch, "out_channels": patch * patch, "sample_size": SIZE // patch,
                **(unet or {})}
    return Space(mode, patch, None, 1.0), None, unet_cfg, dict(SCHEDULER)


def _autoencoder(vae: str | Path | None, device: torch.device) -> tuple[Any, float, str | None]:
    """Latent mode's autoencoder, scaling factor and vae bundle SHA-256: from a latent-mode diffusion
    bundle's ``vae/`` folder when ``vae`` is one, else from the ``vae`` plugin (``vae``: its bundle)."""
    if vae and (Path(vae) / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        bundle = Path(vae)
        b = load_bundle(bundle)
        verify_bundle(bundle, b.tensors)
        if b.config.get("mode") != "latent" or "latent_scaling" not in b.config:
            raise InputError("vae", "a vae bundle, or a latent-mode diffusion bundle", got=str(bundle))
        ae = AutoencoderKL.from_pretrained(bundle / "vae", low_cpu_mem_usage=False).to(device).eval()
        return ae, float(b.config["latent_scaling"]), b.config.get("training", {}).get("vae_weights_sha256")
    from hygeia.plugins import get_registry

    vgen = get_registry().create("generator", "vae", **({"bundle": vae} if vae else {}))
    return vgen.autoencoder.to(device), float(vgen.scaling_factor), vgen.identity.weights_sha256


def _unet(init: str | Path | None, mode: str, unet_cfg: dict[str, Any],
          device: torch.device) -> tuple[Any, dict[str, Any], str | None]:
    """A fresh UNet of ``unet_cfg``, or with ``init`` the UNet of a diffusion bundle of the same mode;
    returns it (training mode), its config and the init bundle's SHA-256."""
    from diffusers import UNet2DModel

    if not init:
        return UNet2DModel(**unet_cfg).to(device).train(), unet_cfg, None
    ib = load_bundle(init)
    verify_bundle(Path(init), ib.tensors)
    if ib.config.get("mode") != mode:
        raise InputError("init", f"a diffusion bundle of mode {mode!r}", got=f"mode {ib.config.get('mode')!r}")
    model = UNet2DModel.from_pretrained(Path(init) / "unet", low_cpu_mem_usage=False).to(device).train()
    return model, dict(model.config), ib.sha256


def _fit(model: Any, noise_sched: Any, x_all: torch.Tensor, y_all: torch.Tensor, *, seed: int, epochs: int,
         batch_size: int, lr: float, p_uncond: float, ema_decay: float, progress: bool, grid: Any) -> list[float]:
    """The DDPM training loop; after each epoch ``grid(ema_model, epoch)`` writes samples of the EMA
    weights. Leaves the EMA weights in ``model`` (eval mode); returns the mean loss of each epoch."""
    from diffusers.training_utils import EMAModel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    device = next(model.parameters()).device
    ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
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
            grid(model, epoch + 1)
            model.train()
            ema.restore(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    return losses


def _write_epoch_grid(unet: Any, sched_cfg: dict[str, Any], space: Space, path: Path, seed: int,
                      guidance: float = DEFAULT_GUIDANCE, negative: str = DEFAULT_NEGATIVE) -> None:
    """Six samples per condition label (one row each; DDIM 25 steps, noise from ``seed``) as a PNG."""
    from diffusers import DDPMScheduler

    from hygeia.outputs import write_png
    from hygeia_lab.grids import image_grid

    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn((6 * len(CONDITION_LABELS), *shape), generator=g).to(device)
    labels = torch.arange(len(CONDITION_LABELS), device=device).repeat_interleave(6)
    cfg = dict(DDPMScheduler(**sched_cfg).config)
    labs = tuple(CONDITION_LABELS)
    base = torch.tensor([negative_class(negative, labs, int(c)) for c in labels], device=device)
    x = denoise(unet, make_scheduler(cfg, "ddim"), noise, labels, 25, guidance, baseline_labels=base)
    imgs = space.decode(x).cpu().numpy()
    write_png(path, image_grid(list(imgs), ncols=6), {"Synthetic": "true",
              "Description": "SYNTHETIC: diffusion training samples, rows: " + ", ".join(CONDITION_LABELS)})
