"""Training of the conditional GAN (what ``hygeia train gan`` runs).

Hinge loss, one discriminator step per generator step, Adam (2e-4, betas 0.5/0.999), an
exponential moving average of the generator's weights (shipped instead of the raw weights).
By default the generator also minimises the auxiliary-classifier term of AC-GAN against a small
finding classifier trained first on the same phantoms and then frozen (:mod:`hygeia_lab.adversarial`).
Each training image is conditioned through one conditioner picked at random (``label`` with the
finding label, ``text`` with one of :data:`hygeia_gan.plugin.PHRASES`' prompts), or through none
with probability ``p_null`` (so unconditional sampling works). Everything random is drawn from
``seed``: on CPU, the same seed and options give the same weights.

After every epoch the bundle is rewritten atomically (an interrupted run keeps the last complete
epoch) and a PNG grid of samples (one row per condition) is written to ``samples``.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hygeia_lab.adversarial import aux_loss, train_finding_classifier
from hygeia.bundles import pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_guidance_scale
from hygeia.vocab import CONDITION_LABELS

from .data import conditional_set
from .networks import UPSAMPLING, Discriminator, Generator
from .plugin import CARD, DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, MAX_GUIDANCE, NAME, VERSION, WEIGHTS, prompts

SUPPORTED = ("label", "text")


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


def train(
    out: str | Path = WEIGHTS,
    seed: int = 0,
    progress: bool = True,
    epochs: int = 36,
    n_per_condition: int = 1200,
    batch_size: int = 32,
    lr: float = 2e-4,
    p_null: float = 0.1,
    conditioners: tuple[str, ...] | str = SUPPORTED,
    g_ch: int = 24,
    d_ch: int = 32,
    z_dim: int = 96,
    embed_dim: int = 64,
    ema: float = 0.999,
    threads: int | None = None,
    device: str | None = None,
    cache: str | Path | None = None,
    samples: str | Path | None = "runs/gan",
    max_minutes: float | None = None,
    checkpoint: str | Path | None = "runs/gan/checkpoint",
    resume: bool = False,
    init: str | Path | None = None,
    aux_weight: float = 1.0,
    classifier_steps: int = 3000,
    mode_seeking: float = 0.1,
    upsampling: str = "resize",
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_condition: str = DEFAULT_NEGATIVE,
    **options: Any,
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
    :data:`hygeia_gan.networks.UPSAMPLING`). ``guidance_scale`` and ``negative_condition``: the
    sampling defaults recorded in the bundle (they do not change training; see
    :meth:`hygeia_gan.plugin.GanGenerator.guided_vectors`).
    """
    if options:
        raise InputError("gan trainer options", "epochs, n_per_condition, batch_size, lr, p_null, conditioners, "
                         "g_ch, d_ch, z_dim, embed_dim, ema, threads, device, cache, samples, max_minutes, checkpoint, resume, init, "
                         "aux_weight, classifier_steps, mode_seeking, upsampling, guidance_scale, negative_condition",
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
    if threads:
        torch.set_num_threads(int(threads))
    dev = pick_device(device)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    tables, rows, meta = _conditioner_tables(tuple(conditioners))
    data, classes = conditional_set(n_per_condition, progress=progress, cache=cache)
    images = torch.from_numpy(data.images)
    dims = {k: v["dim"] for k, v in meta.items()}
    names = list(tables)

    torch.manual_seed(seed)  # here, after plugin loading and data (which may draw from torch's global RNG)
    G = Generator(dims, z_dim=z_dim, embed_dim=embed_dim, ch=g_ch, upsampling=upsampling).to(dev)
    D = Discriminator(dims, ch=d_ch).to(dev)
    C = None
    if aux_weight:  # frozen finding classifier for the AC-GAN term, trained first on the same images
        C = train_finding_classifier(images.to(dev), classes, steps=classifier_steps, seed=seed,
                                     log=print if progress else None)
    init_sha = _load_init(init, G) if init else None
    G_ema = copy.deepcopy(G).eval()
    for p in G_ema.parameters():
        p.requires_grad_(False)
    nets = {"G": G, "D": D, "G_ema": G_ema}  # what a checkpoint holds (C is retrained, deterministically)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))

    def batch_conds(cls: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Condition vectors of a batch of condition indices, and which rows were made null."""
        b = len(cls)
        conds = {k: torch.zeros(b, dims[k]) for k in names}
        which = rng.integers(len(names), size=b)
        null = rng.random(b) < p_null
        for i, k in enumerate(cls):
            if null[i]:
                continue
            name = names[which[i]]
            r = rows[name][k]
            conds[name][i] = tables[name][r[rng.integers(len(r))]]
        return {k: v.to(dev) for k, v in conds.items()}, null

    # fixed noise and label conditions for the per-epoch grid: one row per condition, 8 columns
    grid_z = torch.randn(8 * len(CONDITION_LABELS), z_dim, generator=gen)
    grid_cls = np.repeat(np.arange(len(CONDITION_LABELS)), 8)
    grid_conds = {k: torch.zeros(len(grid_cls), dims[k]) for k in names}
    gname = "label" if "label" in names else names[0]
    for i, k in enumerate(grid_cls):
        grid_conds[gname][i] = tables[gname][rows[gname][k][0]]

    n = len(images)
    steps = n // batch_size
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
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps, desc=f"{NAME}: training", unit="it")
    t0 = time.time()
    it, start = 0, 0
    if resume:
        if checkpoint is None or not (Path(checkpoint) / "model.safetensors").is_file():
            raise InputError("resume", f"a checkpoint from an earlier run at {checkpoint}", got="none found")
        start, it = _load_checkpoint(checkpoint, config, nets, opt_g, opt_d, rng, gen)
        if bar is not None:
            bar.update(min(start, epochs) * steps)
    try:
        for epoch in range(start, epochs):
            perm = rng.permutation(n)
            sums = np.zeros(2)
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                x = images[idx].to(dev)
                c_real, _ = batch_conds(classes[idx])
                z = torch.randn(batch_size, z_dim, generator=gen).to(dev)
                with torch.no_grad():
                    fake = G(z, c_real)
                loss_d = F.relu(1 - D(x, c_real)).mean() + F.relu(1 + D(fake, c_real)).mean()
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

                if mode_seeking:  # two halves with the same conditions, different noise
                    half = rng.integers(len(CONDITION_LABELS), size=batch_size // 2)
                    c_half, null_half = batch_conds(half)
                    gen_cls, null = np.concatenate([half, half]), np.concatenate([null_half, null_half])
                    c_gen = {k: torch.cat([v, v]) for k, v in c_half.items()}
                else:
                    gen_cls = rng.integers(len(CONDITION_LABELS), size=batch_size)
                    c_gen, null = batch_conds(gen_cls)
                z = torch.randn(len(gen_cls), z_dim, generator=gen).to(dev)
                fake = G(z, c_gen)
                loss_g = -D(fake, c_gen).mean()
                keep = torch.from_numpy(~null).to(dev)
                if C is not None and bool(keep.any()):  # conditioned rows should show their condition
                    loss_g = loss_g + aux_weight * aux_loss(C, fake[keep], torch.from_numpy(gen_cls).to(dev)[keep])
                if mode_seeking:
                    m = len(gen_cls) // 2
                    ratio = (fake[:m] - fake[m:]).abs().mean() / (z[:m] - z[m:]).abs().mean()
                    loss_g = loss_g + mode_seeking / (ratio + 1e-5)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                with torch.no_grad():
                    decay = min(ema, (1 + it) / (10 + it))
                    for pe, p in zip(G_ema.parameters(), G.parameters()):
                        pe.lerp_(p, 1 - decay)
                    for be, b in zip(G_ema.buffers(), G.buffers()):
                        be.copy_(b)
                it += 1
                sums += (loss_d.item(), loss_g.item())
                if bar is not None:
                    bar.update(1)
                    if s % 20 == 0:
                        bar.set_postfix(epoch=epoch + 1, d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}")
            config.update(epochs=epoch + 1, iterations=it, last_loss_d=round(sums[0] / steps, 4),
                          last_loss_g=round(sums[1] / steps, 4))
            save_bundle(out, G_ema.state_dict(), config, CARD)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, config, nets, opt_g, opt_d, rng, gen)
            if samples is not None:
                from hygeia_lab.evaluation.generators import write_grid

                with torch.no_grad():
                    grid = G_ema(grid_z.to(dev), {k: v.to(dev) for k, v in grid_conds.items()}).cpu().numpy()
                write_grid(grid, Path(samples) / f"epoch_{epoch + 1:03d}.png", ncol=8,
                           row_labels=list(CONDITION_LABELS))
            msg = (f"{NAME}: epoch {epoch + 1}/{epochs}  loss_d {sums[0] / steps:.3f}  loss_g {sums[1] / steps:.3f}  "
                   f"{time.time() - t0:.0f}s")
            (bar.write if bar is not None else print)(msg)
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                break
    finally:
        if bar is not None:
            bar.close()
    return Path(out)


def _load_init(init: str | Path, G: Any) -> str:
    """Load a gan bundle's (EMA) generator weights into ``G``; returns the bundle's SHA-256."""
    from hygeia.bundles import load_bundle

    b = load_bundle(init)
    try:
        G.load_state_dict(b.tensors)
    except RuntimeError as e:
        raise InputError("init", "a gan bundle trained with the same conditioners, z_dim, embed_dim, g_ch and upsampling",
                         got=f"{init}: {str(e).splitlines()[0]}") from None
    return b.sha256


# --------------------------------------------------------------------------- checkpoints
_HYPER = ("conditioners", "z_dim", "embed_dim", "g_ch", "d_ch", "seed", "batch_size", "lr", "p_null", "ema",
          "n_per_condition", "phantom_difficulty", "init_weights_sha256", "aux_weight", "classifier_steps", "mode_seeking",
          "upsampling")


def _save_checkpoint(path: str | Path, config: dict[str, Any], nets: dict[str, Any], opt_g: Any, opt_d: Any,
                     rng: np.random.Generator, gen: torch.Generator) -> None:
    """Everything needed to continue training, as a bundle (safetensors + JSON; no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name, module in nets.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        sd = opt.state_dict()
        groups[prefix] = sd["param_groups"]
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = gen.get_state()
    state = {"config": config, "param_groups": groups, "numpy_rng": rng.bit_generator.state}
    save_bundle(path, tensors, state, CARD)


def _load_checkpoint(path: str | Path, config: dict[str, Any], nets: dict[str, Any], opt_g: Any, opt_d: Any,
                     rng: np.random.Generator, gen: torch.Generator) -> tuple[int, int]:
    from hygeia.bundles import load_bundle

    b = load_bundle(path)
    saved = b.config["config"]
    diff = [k for k in _HYPER if saved.get(k) != config.get(k)]
    if diff:
        raise InputError("resume", f"the options of the checkpointed run ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)})",
                         got=", ".join(f"{k}={config.get(k)!r}" for k in diff))
    for name, module in nets.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in b.tensors.items() if k.startswith(name + ".")})
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in b.tensors.items():
            if k.startswith(prefix + "."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": b.config["param_groups"][prefix]})
    gen.set_state(b.tensors["rng.torch"])
    rng.bit_generator.state = b.config["numpy_rng"]
    config.update({k: saved[k] for k in ("epochs", "iterations", "last_loss_d", "last_loss_g") if k in saved})
    return int(saved["epochs"]), int(saved["iterations"])
