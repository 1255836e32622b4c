"""Training of the conditional GAN (what ``hygeia train gan`` runs).

Hinge loss, one discriminator step per generator step, Adam (2e-4, betas 0.5/0.999), an
exponential moving average of the generator's weights (shipped instead of the raw weights).
The discriminator is the lab's projection discriminator
(:class:`hygeia_lab.adversarial.ProjectionDiscriminator`). By default the generator also minimises
the auxiliary-classifier term of AC-GAN against a small finding classifier trained first on the
same phantoms and then frozen (:mod:`hygeia_lab.adversarial`). Each training image is conditioned
through one conditioner picked at random (``label`` with the finding label, ``text`` with one of
:func:`hygeia_gan._data.prompts`), or through none with probability ``p_null`` (so unconditional
sampling works). Everything random is drawn from ``seed``: on CPU, the same seed and options give
the same weights.

After every epoch the bundle is rewritten atomically (an interrupted run keeps the last complete
epoch), a training checkpoint too (:mod:`hygeia_gan._checkpoint`), and a PNG grid of samples (one
row per condition) is written to ``samples``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_guidance_scale
from hygeia.vocab import CONDITION_LABELS
from hygeia_lab.adversarial import ProjectionDiscriminator, aux_loss, train_finding_classifier
from hygeia_lab.grids import write_grid

from ._checkpoint import load_checkpoint, save_checkpoint
from ._data import conditional_set, prompts
from .model import UPSAMPLING, Generator
from ._sampling import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, MAX_GUIDANCE, NAME, VERSION
from .plugin import CARD, WEIGHTS

SUPPORTED = ("label", "text")
"""Conditioners the trainer can condition through."""


def train(
    out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True,
    epochs: int = 36, n_per_condition: int = 1200, batch_size: int = 32, lr: float = 2e-4, p_null: float = 0.1,
    conditioners: tuple[str, ...] | str = SUPPORTED, g_ch: int = 24, d_ch: int = 32, z_dim: int = 96,
    embed_dim: int = 64, ema: float = 0.999, threads: int | None = None, device: str | None = None,
    cache: str | Path | None = None, samples: str | Path | None = "runs/gan", max_minutes: float | None = None,
    checkpoint: str | Path | None = "runs/gan/checkpoint", resume: bool = False, init: str | Path | None = None,
    aux_weight: float = 1.0, classifier_steps: int = 3000, mode_seeking: float = 0.1, upsampling: str = "resize",
    guidance_scale: float = DEFAULT_GUIDANCE, negative_condition: str = DEFAULT_NEGATIVE, **options: Any,
) -> Path:
    """Train the GAN on phantoms and write its bundle to ``out``; returns ``out``.

    ``cache``: an .npz to keep the training phantoms in (made on first use). ``max_minutes``:
    stop after the first epoch that ends past this wall-clock budget (the bundle records the
    epochs trained; rerunning with that many epochs reproduces it). ``checkpoint``: a bundle
    folder holding everything needed to continue (both networks, the EMA, the optimisers, the
    random states), rewritten atomically after each epoch; ``resume=True`` continues from it
    (``hygeia train gan --resume --epochs 30``) and gives the same weights as an uninterrupted run.
    ``init``: a gan bundle (same network options) whose generator to start from; the
    discriminator and the optimisers start fresh (a second stage; the bundle records it).
    ``aux_weight``: weight of the auxiliary-classifier term (AC-GAN): a finding classifier is
    first trained on the training images (``classifier_steps`` steps, then frozen; see
    :mod:`hygeia_lab.adversarial`), and the generator is pushed to make images it classifies as the
    requested condition (0 = plain projection GAN). ``mode_seeking``: weight of the
    mode-seeking term (MSGAN, Mao et al. 2019; 0 = off), which keeps two noises with the same
    condition from giving the same image. ``upsampling``: ``transposed`` or ``resize``
    (nearest-neighbour upsampling + 3x3 convolutions, no checkerboard artifacts; see
    :data:`hygeia_gan.model.UPSAMPLING`). ``guidance_scale`` and ``negative_condition``: the
    sampling defaults recorded in the bundle (they do not change training; see
    :meth:`hygeia_gan._sampling.Sampling.guided_vectors`).
    """
    conditioners = _check_options(options, epochs=epochs, n_per_condition=n_per_condition, batch_size=batch_size,
                                  classifier_steps=classifier_steps, aux_weight=aux_weight, mode_seeking=mode_seeking,
                                  upsampling=upsampling, guidance_scale=guidance_scale,
                                  negative_condition=negative_condition, conditioners=conditioners)
    if threads:
        torch.set_num_threads(int(threads))
    dev = pick_device(device)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    tables, rows, meta = _conditioner_tables(conditioners)
    data, classes = conditional_set(n_per_condition, progress=progress, cache=cache)
    images = torch.from_numpy(data.images)
    dims = {k: v["dim"] for k, v in meta.items()}

    torch.manual_seed(seed)  # here, after plugin loading and data (which may draw from torch's global RNG)
    G, D, G_ema, C, init_sha = _networks(dims, images, classes, dev, seed=seed, z_dim=z_dim, embed_dim=embed_dim,
                                         g_ch=g_ch, d_ch=d_ch, upsampling=upsampling, aux_weight=aux_weight,
                                         classifier_steps=classifier_steps, progress=progress, init=init)
    run = _Run(G=G, D=D, G_ema=G_ema, C=C,
               opt_g=torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999)),
               opt_d=torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999)),
               rng=rng, gen=gen, conds=_ConditionSampler(tables, rows, dims, p_null, rng, dev), dev=dev,
               z_dim=z_dim, batch_size=batch_size, ema=ema, aux_weight=aux_weight, mode_seeking=mode_seeking)
    grid = _grid_inputs(run, tables, rows)
    config: dict[str, Any] = {
        "conditioners": meta, "z_dim": z_dim, "embed_dim": embed_dim, "g_ch": g_ch, "d_ch": d_ch, "size": 64,
        "seed": seed, "epochs": 0, "iterations": 0, "batch_size": batch_size, "lr": lr, "p_null": p_null,
        "ema": ema, "n_per_condition": n_per_condition, "phantom_difficulty": data.difficulty,
        "condition_labels": list(CONDITION_LABELS), "version": VERSION, "loss": "hinge",
        "aux_weight": aux_weight, "classifier_steps": classifier_steps, "mode_seeking": mode_seeking,
        "upsampling": upsampling,
        "sampling": {"guidance_scale": float(guidance_scale), "negative_condition": negative_condition},
        **({"init_weights_sha256": init_sha} if init_sha else {}),
    }
    _fit(run, images, classes, config, out=out, epochs=epochs, progress=progress, checkpoint=checkpoint,
         resume=resume, samples=samples, grid=grid, max_minutes=max_minutes)
    return Path(out)


def _networks(dims: dict[str, int], images: torch.Tensor, classes: np.ndarray, dev: torch.device, *, seed: int,
              z_dim: int, embed_dim: int, g_ch: int, d_ch: int, upsampling: str, aux_weight: float,
              classifier_steps: int, progress: bool,
              init: str | Path | None) -> tuple[Generator, ProjectionDiscriminator, Generator, Any, str | None]:
    """G and D (from torch's global RNG), the frozen finding classifier of the AC-GAN term (None when
    ``aux_weight`` is 0), G's weights from ``init``, the EMA copy of G; and the init bundle's SHA-256."""
    G = Generator(dims, z_dim=z_dim, embed_dim=embed_dim, ch=g_ch, upsampling=upsampling).to(dev)
    D = ProjectionDiscriminator(dims, ch=d_ch).to(dev)
    C = None
    if aux_weight:  # frozen finding classifier for the AC-GAN term, trained first on the same images
        C = train_finding_classifier(images.to(dev), classes, steps=classifier_steps, seed=seed,
                                     log=print if progress else None)
    init_sha = _load_init(init, G) if init else None
    G_ema = copy.deepcopy(G).eval()
    for p in G_ema.parameters():
        p.requires_grad_(False)
    return G, D, G_ema, C, init_sha


def _check_options(options: dict[str, Any], *, epochs: Any, n_per_condition: Any, batch_size: Any,
                   classifier_steps: Any, aux_weight: Any, mode_seeking: Any, upsampling: Any,
                   guidance_scale: Any, negative_condition: Any, conditioners: Any) -> tuple[str, ...]:
    """InputError for an unknown option or a value out of range; returns the conditioner names."""
    if options:
        raise InputError("gan trainer options", "epochs, n_per_condition, batch_size, lr, p_null, conditioners, "
                         "g_ch, d_ch, z_dim, embed_dim, ema, threads, device, cache, samples, max_minutes, "
                         "checkpoint, resume, init, aux_weight, classifier_steps, mode_seeking, upsampling, "
                         "guidance_scale, negative_condition",
                         got=", ".join(sorted(options)))
    for key, val, lo in (("epochs", epochs, 1), ("n_per_condition", n_per_condition, 8), ("batch_size", batch_size, 2),
                         ("classifier_steps", classifier_steps, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise InputError(key, f"an integer >= {lo}", got=repr(val))
    for key, fval in (("aux_weight", aux_weight), ("mode_seeking", mode_seeking)):
        if isinstance(fval, bool) or not isinstance(fval, (int, float)) or not 0 <= fval <= 100:
            raise InputError(key, "a number in [0, 100]", got=repr(fval))
    if upsampling not in UPSAMPLING:
        raise InputError("upsampling", " or ".join(UPSAMPLING), got=repr(upsampling))
    check_guidance_scale(guidance_scale, MAX_GUIDANCE)
    if not isinstance(negative_condition, str):
        raise InputError("negative_condition", "a finding label, a text prompt or 'none'", got=repr(negative_condition))
    if isinstance(conditioners, str):
        conditioners = tuple(c.strip() for c in conditioners.split(",") if c.strip())
    return tuple(conditioners)


def _conditioner_tables(names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, list[np.ndarray]], dict[str, Any]]:
    """Per conditioner: a table of condition vectors, the rows usable for each class, its metadata."""
    from hygeia.plugins import get_registry

    reg = get_registry()
    tables, rows, meta = {}, {}, {}
    for name in names:
        if name not in SUPPORTED:
            raise InputError("conditioners", f"a subset of {SUPPORTED}", got=name)
        spec = reg.get("conditioner", name)
        cond = reg.create("conditioner", name)
        if name == "label":
            table = cond.encode(list(CONDITION_LABELS))
            rows[name] = [np.array([k]) for k in range(len(CONDITION_LABELS))]
        else:
            pairs = prompts()
            table = cond.encode([p for _, p in pairs])
            cls = np.array([k for k, _ in pairs])
            rows[name] = [np.flatnonzero(cls == k) for k in range(len(CONDITION_LABELS))]
        tables[name] = table.float().cpu()
        meta[name] = {"dim": int(cond.dim), "kinds": sorted(cond.condition_kinds), "version": spec.version,
                      "weights_sha256": cond.identity.weights_sha256}
    return tables, rows, meta


class _ConditionSampler:
    """Condition vectors of a batch of condition indices: each row through one conditioner picked
    at random (one of its table rows for that class), or null with probability ``p_null``."""

    def __init__(self, tables: dict[str, torch.Tensor], rows: dict[str, list[np.ndarray]], dims: dict[str, int],
                 p_null: float, rng: np.random.Generator, dev: torch.device) -> None:
        self.tables, self.rows, self.dims, self.p_null, self.rng, self.dev = tables, rows, dims, p_null, rng, dev
        self.names = list(tables)

    def __call__(self, cls: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """``({conditioner: [B, D]} on the device, which rows were made null)``."""
        b = len(cls)
        conds = {k: torch.zeros(b, self.dims[k]) for k in self.names}
        which = self.rng.integers(len(self.names), size=b)
        null = self.rng.random(b) < self.p_null
        for i, k in enumerate(cls):
            if null[i]:
                continue
            name = self.names[which[i]]
            r = self.rows[name][k]
            conds[name][i] = self.tables[name][r[self.rng.integers(len(r))]]
        return {k: v.to(self.dev) for k, v in conds.items()}, null


@dataclass
class _Run:
    """The networks, optimisers, random streams and loss weights of one training run."""

    G: Generator
    D: ProjectionDiscriminator
    G_ema: Generator
    C: Any
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    rng: np.random.Generator
    gen: torch.Generator
    conds: _ConditionSampler
    dev: torch.device
    z_dim: int
    batch_size: int
    ema: float
    aux_weight: float
    mode_seeking: float

    @property
    def nets(self) -> dict[str, Any]:
        """What a checkpoint holds (C is retrained, deterministically)."""
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema}


def _grid_inputs(run: _Run, tables: dict[str, torch.Tensor],
                 rows: dict[str, list[np.ndarray]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fixed noise and label conditions for the per-epoch grid: one row per condition, 8 columns."""
    names = run.conds.names
    grid_z = torch.randn(8 * len(CONDITION_LABELS), run.z_dim, generator=run.gen)
    grid_cls = np.repeat(np.arange(len(CONDITION_LABELS)), 8)
    grid_conds = {k: torch.zeros(len(grid_cls), run.conds.dims[k]) for k in names}
    gname = "label" if "label" in names else names[0]
    for i, k in enumerate(grid_cls):
        grid_conds[gname][i] = tables[gname][rows[gname][k][0]]
    return grid_z, grid_conds


def _fit(run: _Run, images: torch.Tensor, classes: np.ndarray, config: dict[str, Any], *, out: str | Path,
         epochs: int, progress: bool, checkpoint: str | Path | None, resume: bool, samples: str | Path | None,
         grid: tuple[torch.Tensor, dict[str, torch.Tensor]], max_minutes: float | None) -> None:
    """The epochs (from the checkpoint's with ``resume``); after each: bundle, checkpoint, sample grid."""
    steps = len(images) // run.batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps, desc=f"{NAME}: training", unit="it")
    t0 = time.time()
    it, start = 0, 0
    if resume:
        if checkpoint is None or not (Path(checkpoint) / "model.safetensors").is_file():
            raise InputError("resume", f"a checkpoint from an earlier run at {checkpoint}", got="none found")
        start, it = load_checkpoint(checkpoint, config, run.nets, run.opt_g, run.opt_d, run.rng, run.gen)
        if bar is not None:
            bar.update(min(start, epochs) * steps)
    try:
        for epoch in range(start, epochs):
            it, sums = _epoch(run, images, classes, epoch, it, bar)
            config.update(epochs=epoch + 1, iterations=it, last_loss_d=round(sums[0] / steps, 4),
                          last_loss_g=round(sums[1] / steps, 4))
            save_bundle(out, run.G_ema.state_dict(), config, CARD)
            if checkpoint is not None:
                save_checkpoint(checkpoint, config, run.nets, run.opt_g, run.opt_d, run.rng, run.gen)
            if samples is not None:
                _write_samples(run, grid, Path(samples) / f"epoch_{epoch + 1:03d}.png")
            msg = (f"{NAME}: epoch {epoch + 1}/{epochs}  loss_d {sums[0] / steps:.3f}  loss_g {sums[1] / steps:.3f}  "
                   f"{time.time() - t0:.0f}s")
            (bar.write if bar is not None else print)(msg)
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                break
    finally:
        if bar is not None:
            bar.close()


def _epoch(run: _Run, images: torch.Tensor, classes: np.ndarray, epoch: int, it: int,
           bar: Any) -> tuple[int, np.ndarray]:
    """One pass over a permutation of the images; returns the iteration count and the summed losses."""
    n, batch_size = len(images), run.batch_size
    steps = n // batch_size
    perm = run.rng.permutation(n)
    sums = np.zeros(2)
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        loss_d, loss_g = _step(run, images[idx].to(run.dev), classes[idx], it)
        it += 1
        sums += (loss_d.item(), loss_g.item())
        if bar is not None:
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}")
    return it, sums


def _step(run: _Run, x: torch.Tensor, cls: np.ndarray, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One discriminator step on a real batch, one generator step, one EMA update; the two losses."""
    c_real, _ = run.conds(cls)
    z = torch.randn(run.batch_size, run.z_dim, generator=run.gen).to(run.dev)
    with torch.no_grad():
        fake = run.G(z, c_real)
    loss_d = F.relu(1 - run.D(x, c_real)).mean() + F.relu(1 + run.D(fake, c_real)).mean()
    run.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    run.opt_d.step()

    loss_g = _generator_loss(run)
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    run.opt_g.step()
    with torch.no_grad():
        decay = min(run.ema, (1 + it) / (10 + it))
        for pe, p in zip(run.G_ema.parameters(), run.G.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(run.G_ema.buffers(), run.G.buffers()):
            be.copy_(b)
    return loss_d, loss_g


def _generator_loss(run: _Run) -> torch.Tensor:
    """Hinge generator loss on a fresh batch of conditions, plus the AC-GAN and mode-seeking terms."""
    if run.mode_seeking:  # two halves with the same conditions, different noise
        half = run.rng.integers(len(CONDITION_LABELS), size=run.batch_size // 2)
        c_half, null_half = run.conds(half)
        gen_cls, null = np.concatenate([half, half]), np.concatenate([null_half, null_half])
        c_gen = {k: torch.cat([v, v]) for k, v in c_half.items()}
    else:
        gen_cls = run.rng.integers(len(CONDITION_LABELS), size=run.batch_size)
        c_gen, null = run.conds(gen_cls)
    z = torch.randn(len(gen_cls), run.z_dim, generator=run.gen).to(run.dev)
    fake = run.G(z, c_gen)
    loss_g = -run.D(fake, c_gen).mean()
    keep = torch.from_numpy(~null).to(run.dev)
    if run.C is not None and bool(keep.any()):  # conditioned rows should show their condition
        loss_g = loss_g + run.aux_weight * aux_loss(run.C, fake[keep], torch.from_numpy(gen_cls).to(run.dev)[keep])
    if run.mode_seeking:
        m = len(gen_cls) // 2
        ratio = (fake[:m] - fake[m:]).abs().mean() / (z[:m] - z[m:]).abs().mean()
        loss_g = loss_g + run.mode_seeking / (ratio + 1e-5)
    return loss_g


def _write_samples(run: _Run, grid: tuple[torch.Tensor, dict[str, torch.Tensor]], path: Path) -> None:
    """The EMA generator's images of the fixed grid inputs, one row per condition, as a PNG."""
    grid_z, grid_conds = grid
    with torch.no_grad():
        images = run.G_ema(grid_z.to(run.dev), {k: v.to(run.dev) for k, v in grid_conds.items()}).cpu().numpy()
    write_grid(images, path, ncol=8, row_labels=list(CONDITION_LABELS))


def _load_init(init: str | Path, G: Any) -> str:
    """Load a gan bundle's (EMA) generator weights into ``G``; returns the bundle's SHA-256."""
    b = load_bundle(init)
    try:
        G.load_state_dict(b.tensors)
    except RuntimeError as e:
        raise InputError("init", "a gan bundle trained with the same conditioners, z_dim, embed_dim, g_ch and upsampling",
                         got=f"{init}: {str(e).splitlines()[0]}") from None
    return b.sha256
