"""The ``vae`` trainer (``hygeia train vae``): the autoencoder, then the label priors and the flow.

1. The autoencoder (:func:`hygeia_vae.model.build_autoencoder`) is trained as a VAE on 64x64
   phantoms, one clean condition per image (``findings=[label]``), an equal number per label,
   each label drawn from its own range of training-split seeds: the per-image negative ELBO
   (Gaussian likelihood with a fixed decoder noise ``recon_sigma`` on the [0, 1] scale, plus the
   KL to N(0, I)), AdamW with a one-cycle learning rate. After every epoch a PNG grid of prior
   samples (one row per label) is written.
2. The scaling factor (unit-variance latents) and the label priors (:mod:`hygeia_vae._prior`) are
   fitted to the posterior means of all training images.
3. The conditional flow (:class:`hygeia_vae.model.FlowPrior`) is fitted by maximum likelihood to
   samples of the aggregate posterior (each training image's ``N(mu, prior_noise * sd)``, a fresh
   draw every epoch), conditioned on the image's label: the guide of the mixture
   (``guide="flow"``) or the prior itself (``prior="flow"``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_guidance_scale
from hygeia.vocab import CONDITION_LABELS
from hygeia_lab.phantoms import class_conditional_set

from ._bundle import (DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_TEMPERATURE, GUIDES, MAX_GUIDANCE, NAME,
                      PIXEL_SPACING, PRIOR_KINDS, WEIGHTS, card_with, check_temperature)
from ._prior import fit_priors, sample_prior
from .model import AUTOENCODER, NO_NEGATIVE, PRIORS, SIZE, FlowPrior, build_autoencoder


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, epochs: int = 6, n_per_class: int = 3000,
          batch_size: int = 16, lr: float = 2e-3, recon_sigma: float = 0.01, prior_rank: int = 48,
          prior: str = "pca-gmm", prior_pcs: int = 96, prior_components: int = 30, prior_epochs: int = 40,
          prior_blocks: int = 12, prior_hidden: int = 96, prior_noise: float = 0.25, guide: str = "flow",
          autoencoder_from: str | Path | None = None, n_val: int = 256, samples_dir: str | Path | None = None,
          cache: str | Path | None = None, threads: int | None = None,
          block_out_channels: list[int] | tuple[int, ...] | None = None, attention: bool | None = None,
          guidance_scale: float = DEFAULT_GUIDANCE, negative_condition: str = DEFAULT_NEGATIVE,
          temperature: float = DEFAULT_TEMPERATURE, **options: Any) -> Path:
    """Train the VAE and fit its label priors; write the bundle to ``out`` (what ``hygeia train vae`` runs).

    Reproducible from ``seed`` on one device and thread count. A PNG grid of samples (one row
    per condition) is written to ``samples_dir`` (default ``runs/vae``) after every epoch.
    ``guidance_scale``, ``negative_condition`` and ``temperature``: the sampling defaults recorded
    in the bundle (they do not change training). ``prior``: ``pca-gmm`` (a Gaussian mixture of
    ``prior_components`` full-covariance components in each label's top ``prior_pcs`` principal
    directions), ``gaussian`` (rank ``prior_rank`` plus a diagonal residual) or ``flow`` (experimental:
    a conditional Glow of ``prior_blocks`` blocks and ``prior_hidden`` channels trained for
    ``prior_epochs`` on posterior samples with their noise scaled by ``prior_noise``).
    ``guide``: how a ``pca-gmm`` or ``gaussian`` prior is guided: ``flow`` (the default; trains the
    same conditional flow beside it) or ``mean`` (the mean shift).
    ``autoencoder_from``: a trained vae bundle whose autoencoder is reused (no autoencoder epochs;
    only the priors are fitted).
    """
    if options:
        raise InputError("train options", "epochs, n_per_class, batch_size, lr, recon_sigma, prior_rank, n_val, "
                         "samples_dir, cache, threads, block_out_channels, attention, guidance_scale, "
                         "negative_condition, temperature, prior, prior_pcs, prior_components, prior_epochs, "
                         "prior_blocks, prior_hidden, prior_noise, guide, autoencoder_from",
                         got=", ".join(sorted(options)))
    _check_choices(guidance_scale, temperature, prior, guide, negative_condition)
    arch = _architecture(block_out_channels, attention)
    _check_counts({"epochs": (epochs, 1), "n_per_class": (n_per_class, 8), "batch_size": (batch_size, 2),
                   "prior_rank": (prior_rank, 1), "n_val": (n_val, 1), "prior_pcs": (prior_pcs, 1),
                   "prior_components": (prior_components, 1), "prior_epochs": (prior_epochs, 1),
                   "prior_blocks": (prior_blocks, 1), "prior_hidden": (prior_hidden, 1)}, prior_noise)
    source = _source_bundle(autoencoder_from)
    if source is not None:  # reuse a trained bundle's autoencoder: only the priors are fitted
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
    t0 = time.time()
    log = _train_autoencoder(ae, x_all, conds, epochs=epochs, batch_size=batch_size, lr=lr, recon_sigma=recon_sigma,
                             seed=seed, samples_dir=samples_dir, prior_rank=prior_rank, progress=progress, t0=t0)
    ae.eval()
    # latent statistics, the label priors and held-out reconstruction error
    mu, sd = _posteriors(ae, x_all, device)
    scaling = float(1.0 / mu.std())
    ae.register_to_config(scaling_factor=scaling)
    priors, prior_config = _fit_label_priors(
        mu, sd, conds, scaling, device, log, prior=prior, prior_rank=prior_rank, prior_pcs=prior_pcs,
        prior_components=prior_components, guide=guide, prior_epochs=prior_epochs, prior_blocks=prior_blocks,
        prior_hidden=prior_hidden, prior_noise=prior_noise, seed=seed, progress=progress, t0=t0)
    val_mse = _val_reconstruction_mse(ae, n_val, device)
    metrics = {**{k: round(v, 6) for k, v in log.items()}, "val_reconstruction_mse": round(val_mse, 6),
               "val_reconstruction_psnr_db": round(10 * math.log10(1.0 / max(val_mse, 1e-12)), 2),
               "train_minutes": round((time.time() - t0) / 60, 1)}
    tensors = {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}
    tensors.update({f"prior.{k}": v for k, v in priors.items()})
    sampling = {"guidance_scale": float(guidance_scale), "negative_condition": negative_condition,
                "temperature": float(temperature)}
    training = {"seed": seed, "epochs": epochs, "n_per_class": n_per_class, "batch_size": batch_size, "lr": lr,
                "recon_sigma": recon_sigma, "device": str(device), "torch": torch.__version__}
    config = _bundle_config(arch, scaling, list(mu.shape[1:]), prior_rank, prior_config, sampling, training, source)
    save_bundle(out, tensors, config, card_with(metrics))
    return out


def _bundle_config(arch: dict[str, Any], scaling: float, latent_shape: list[int], prior_rank: int,
                   prior_config: dict[str, Any], sampling: dict[str, Any], training: dict[str, Any],
                   source: Any) -> dict[str, Any]:
    """``config.json`` of a trained bundle (``source``: the bundle the autoencoder came from, or None)."""
    return {
        "autoencoder": {**arch, "scaling_factor": scaling},
        "latent_shape": latent_shape,
        "priors": list(PRIORS),
        "prior_rank": prior_rank,
        "prior": prior_config,
        "image_size": SIZE,
        "pixel_spacing_mm": list(PIXEL_SPACING),
        "sampling": sampling,
        "training": {**training,
                     **({"autoencoder_from": {"weights_sha256": source.sha256,
                                              "training": source.config.get("training", {})}} if source else {})},
    }


# --------------------------------------------------------------------------- option checks
def _check_choices(guidance_scale: Any, temperature: Any, prior: Any, guide: Any, negative_condition: Any) -> None:
    check_guidance_scale(guidance_scale, MAX_GUIDANCE)
    check_temperature(temperature)
    if prior not in PRIOR_KINDS:
        raise InputError("prior", " or ".join(PRIOR_KINDS), got=repr(prior))
    if guide not in GUIDES:
        raise InputError("guide", " or ".join(GUIDES) + " (how a mixture or Gaussian prior is guided)", got=repr(guide))
    if not isinstance(negative_condition, str) or negative_condition not in PRIORS:
        raise InputError("negative_condition", f"a label of {', '.join(CONDITION_LABELS)} or {NO_NEGATIVE!r}",
                         got=repr(negative_condition))


def _architecture(block_out_channels: Any, attention: Any) -> dict[str, Any]:
    """:data:`AUTOENCODER` with the ``block_out_channels`` and ``attention`` options applied (checked)."""
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
    return arch


def _check_counts(counts: dict[str, tuple[Any, int]], prior_noise: Any) -> None:
    """Each ``name: (value, lowest)`` an integer >= lowest; ``prior_noise`` in [0, 1]."""
    for name, (v, lo) in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(name, f"an integer >= {lo}", got=repr(v))
    if isinstance(prior_noise, bool) or not isinstance(prior_noise, (int, float)) or not 0 <= prior_noise <= 1:
        raise InputError("prior_noise", "a number in [0, 1] (the posterior noise the flow prior is trained on)",
                         got=repr(prior_noise))


def _source_bundle(autoencoder_from: str | Path | None) -> Any:
    """The vae bundle named by ``autoencoder_from`` (None: none)."""
    if autoencoder_from is None:
        return None
    try:
        source = load_bundle(autoencoder_from)
    except Exception as e:
        raise InputError("autoencoder_from", "a vae bundle folder", got=f"{autoencoder_from} ({e})") from e
    if "autoencoder" not in source.config:
        raise InputError("autoencoder_from", "a vae bundle (config.json has no 'autoencoder')",
                         got=str(autoencoder_from))
    return source


# --------------------------------------------------------------------------- autoencoder
def _train_autoencoder(ae: Any, x_all: torch.Tensor, conds: np.ndarray, *, epochs: int, batch_size: int, lr: float,
                       recon_sigma: float, seed: int, samples_dir: Path, prior_rank: int, progress: bool,
                       t0: float) -> dict[str, float]:
    """``epochs`` epochs of the negative ELBO; returns the last epoch's mean MSE and KL ({} for 0 epochs)."""
    device = next(ae.parameters()).device
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    w_rec = 1.0 / (2 * recon_sigma ** 2)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
    return log


def _write_epoch_grid(ae: Any, x_all: torch.Tensor, conds: np.ndarray, path: Path, rank: int, seed: int) -> None:
    """Samples from priors fitted on 128 images per label: one row of 8 per condition label."""
    from hygeia.outputs import write_png
    from hygeia_lab.grids import image_grid

    device = next(ae.parameters()).device
    idx = np.concatenate([np.flatnonzero(conds == k)[:128] for k in range(len(CONDITION_LABELS))])
    with torch.no_grad():
        mu = ae.encode(x_all[idx].to(device) * 2 - 1).latent_dist.mean.cpu()
        prior = fit_priors(mu.flatten(1), torch.from_numpy(conds[idx]), min(rank, 32))
        rows = []
        for k in range(len(CONDITION_LABELS)):
            z = sample_prior(prior, k, 8, seed).view(8, *mu.shape[1:])
            rows.append(((ae.decode(z.to(device)).sample.cpu() + 1) / 2).clamp(0, 1).numpy())
    write_png(path, image_grid(list(np.concatenate(rows)), ncols=8), {"Synthetic": "true",
              "Description": "SYNTHETIC: vae training samples, rows: " + ", ".join(CONDITION_LABELS)})


def _posteriors(ae: Any, x_all: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every training image (CPU)."""
    with torch.no_grad():
        posts = [ae.encode(x_all[i:i + 256].to(device) * 2 - 1).latent_dist for i in range(0, len(x_all), 256)]
    return torch.cat([p.mean.cpu() for p in posts]), torch.cat([p.std.cpu() for p in posts])


def _val_reconstruction_mse(ae: Any, n_val: int, device: Any) -> float:
    """Mean squared error of ``n_val`` validation phantoms encoded (posterior mean) and decoded."""
    from hygeia_lab import make_phantom_set

    val = torch.from_numpy(make_phantom_set(n_val, split="val", size=SIZE).images)
    with torch.no_grad():
        r = (ae.decode(ae.encode(val.to(device) * 2 - 1).latent_dist.mean).sample.cpu() + 1) / 2
    return float((r.clamp(0, 1) - val).pow(2).mean())


# --------------------------------------------------------------------------- priors
def _fit_label_priors(mu: torch.Tensor, sd: torch.Tensor, conds: np.ndarray, scaling: float, device: Any,
                      log: dict[str, float], *, prior: str, prior_rank: int, prior_pcs: int, prior_components: int,
                      guide: str, prior_epochs: int, prior_blocks: int, prior_hidden: int, prior_noise: float,
                      seed: int, progress: bool, t0: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The prior tensors (without the ``prior.`` prefix) and ``config["prior"]``; the flow's training
    log is added to ``log``."""
    prior_config: dict[str, Any] = {"kind": prior}
    if prior != "flow":
        priors = fit_priors(mu.flatten(1), torch.from_numpy(conds), prior_rank, prior, prior_pcs, prior_components,
                            seed)
        if prior == "pca-gmm":
            prior_config.update(pcs=prior_pcs, components=prior_components)
        prior_config["guidance"] = guide
    if prior == "flow" or guide == "flow":
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
    return priors, prior_config


def train_flow_prior(mu: torch.Tensor, sd: torch.Tensor, rows: torch.Tensor, n_conditions: int, pooled_row: int,
                     epochs: int = 40, seed: int = 0, blocks: int = 12, hidden: int = 96, emb: int = 8,
                     batch_size: int = 64, lr: float = 1e-3, drop: float = 0.1,
                     report: Callable[[int, int, float], None] | None = None) -> tuple[FlowPrior, dict[str, float]]:
    """Fit a :class:`FlowPrior` to posterior samples ``mu + sd * eps`` (scaled latents ``[N, 4, 16, 16]``).

    AdamW with a one-cycle learning rate, gradient norm clipped at 5; a fraction ``drop`` of each
    batch gets the ``pooled_row`` condition. Reproducible from ``seed`` on one device and thread
    count. ``report(epoch, epochs, nll)`` after every epoch.
    """
    device = mu.device
    flow = FlowPrior(n_conditions, blocks, hidden, emb, seed).to(device)
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=0)
    batch_size = min(batch_size, len(mu))  # tiny runs (tests): one batch of everything
    steps = len(mu) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0, nll = time.time(), float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(len(mu), generator=g)
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size].to(device)
            z = mu[idx] + sd[idx] * torch.randn(len(idx), *mu.shape[1:], generator=g).to(device)
            r = rows[idx].clone()
            r[(torch.rand(len(idx), generator=g) < drop).to(device)] = pooled_row
            loss = flow.nll(z, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
        nll = total / steps
        if report is not None:
            report(epoch + 1, epochs, nll)
    return flow.eval().requires_grad_(False), {"prior_train_nll_per_dim": round(nll, 4),
                                               "prior_train_minutes": round((time.time() - t0) / 60, 1)}
