"""``hygeia train fusion``: train the fusion diagnoser on phantoms and their clinical text.

Reproducible from ``seed`` (phantom sets are drawn from fixed split seeds; shuffling, text dropout,
augmentation and initialisation from ``seed``). The text encoder is frozen, so its token states
are computed once per training set (exact, and ~30x faster than running it every step).
Besides the finding labels, the evidence maps are trained against the phantoms' finding masks
(``mask_pool``: area-averaged to the map size, so a cell's target is the share of it the finding
covers and the map's maximum sits where the finding is, not on a cell it merely touches; binary
cross-entropy with ``mask_pos_weight`` on the rare positive cells; weight ``mask_weight``), which
is what makes the heat maps point at the finding. Thresholds are chosen on the validation split
(Youden's J), with and without text. The bundle holds only the trainable weights; the encoder's
name and SHA-256 go into its config. The plugin's spec names :func:`train` as
``"hygeia_fusion.train:train"``: this module (and the lab it uses) is imported only when training
starts.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hygeia.bundles import pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_option_values
from hygeia.vocab import FINDING_LABELS
from hygeia_lab import PhantomSet, load_npz, make_phantom_set, save_npz
from hygeia_lab.phantoms import code_hash
from hygeia_lab.training import auroc_per_finding
from hygeia_lab.training import youden_thresholds as lab_youden

from ._losses import finding_weights, pointing_loss
from .model import ARCH_DEFAULTS, FusionNet, arch_config, encode_texts, encoder_identity, warm_start
from .plugin import WEIGHTS, card

DEFAULTS: dict[str, Any] = {
    "epochs": 6, "n_train": 8000, "n_val": 1000, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
    "text_dropout": 0.3, "shift": 8, "threads": 0, **ARCH_DEFAULTS, "mask_weight": 1.0,
    "mask_pool": "avg", "mask_pos_weight": 4.0, "max_tokens": 128, "init": None, "size": 256, "difficulty": 2.0,
    "baselines": True, "text_shuffle": 0.0, "mimics": 0.0, "mask_finding_weight": {},
    "mask_point_weight": 0.0,
}
"""The shipped network: the ``cxr`` diagnoser's backbone layout (MONAI ResNet, 7x7 stem, blocks
2-2-2-2) at widths 16-128, warm-started from an image-only bundle of that layout (``init``), at
256 px on phantoms of difficulty 2 (the shipped weights then continue at difficulty 3: see the model card)."""

_FILE_OPTIONS = ("data", "image_root", "codes", "uncertain", "text_column")  # --data's companions

Callback = Callable[[int, dict[str, float]], None]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]  # see _batch_loss


def _dataset(split: str, n: int, data_dir: Path | None, progress: bool, size: int = 64,
             difficulty: float = 1.0, mimics: float = 0.0) -> PhantomSet:
    f = None
    if data_dir is not None:
        tag = (("" if size == 64 else f"_{size}px") + ("" if difficulty == 1.0 else f"_d{difficulty:g}")
               + (f"_m{mimics:g}" if mimics else "") + f"_{code_hash()[:12]}")  # a new generator: new sets
        f = Path(data_dir) / f"{split}_{n}{tag}.npz"
        if f.is_file():
            return load_npz(f)
    ps = make_phantom_set(n, split, size=size, difficulty=difficulty, progress=progress,
                          workers=max(1, min(4, os.cpu_count() or 1)), mimics=mimics)
    if f is not None:
        save_npz(f, ps)
    return ps


def _text_states(texts: list[str], max_tokens: int,
                 cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states of unique texts, float16 ``[U, T, 384]``, mask ``[U, T]`` and index ``[N]``.

    With ``cache`` (a folder), the states are stored there as safetensors, keyed by the SHA-256 of
    the texts, ``max_tokens`` and the encoder's weights, and reused by the next run.
    """
    import hashlib

    from safetensors.torch import load_file, save_file

    uniq, inv = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    idx = torch.from_numpy(inv.astype(np.int64).ravel())
    f = None
    if cache is not None:
        h = hashlib.sha256("\x00".join(uniq).encode())
        h.update(f"{max_tokens}:{encoder_identity()['sha256']}".encode())
        f = Path(cache) / f"text_states_{h.hexdigest()[:16]}.safetensors"
        if f.is_file():
            t = load_file(str(f))
            return t["states"], t["mask"], idx
    states, mask = encode_texts(list(uniq), max_tokens=max_tokens)
    states = states.half()
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        save_file({"states": states.contiguous(), "mask": mask.contiguous()}, str(tmp))
        os.replace(tmp, f)
    return states, mask, idx


def _augment(x: torch.Tensor, g: torch.Generator, shift: int,
             masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random translation (reflect-padded, up to ``shift`` px; masks moved alike, zero-padded) and
    contrast/brightness jitter."""
    b = x.shape[0]
    if shift > 0:
        pad = F.pad(x, (shift,) * 4, mode="reflect")
        mpad = F.pad(masks, (shift,) * 4) if masks is not None else None
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        h, w = x.shape[-2:]
        x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        if mpad is not None:
            masks = torch.stack([mpad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    a = 1 + 0.1 * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
    c = 0.04 * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
    return (x * a + c).clamp(0, 1), masks


def _predict(net: FusionNet, images: np.ndarray, states: torch.Tensor | None, mask: torch.Tensor | None,
             idx: torch.Tensor | None, device: torch.device, bs: int = 64) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), bs):
            x = torch.from_numpy(images[i:i + bs]).to(device)
            s = m = None
            if states is not None and idx is not None and mask is not None:
                j = idx[i:i + bs]
                s, m = states[j].float().to(device), mask[j].to(device)
            out.append(torch.sigmoid(net(x, s, m)["logits"]).cpu().numpy())
    return np.concatenate(out)


def _aurocs(y: np.ndarray, p: np.ndarray) -> list[float]:
    return auroc_per_finding(y, p, np.ones_like(y))


def youden_thresholds(y: np.ndarray, p: np.ndarray) -> list[float]:
    """Per finding, the threshold maximising sensitivity + specificity - 1 on (y, p) (the lab's rule)."""
    return lab_youden(y, p, np.ones_like(y))


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, epochs: int | None = None,
          data_dir: str | Path | None = None, device: str | None = None,
          callback: Callback | None = None, **options: Any) -> Path:
    """Train the fusion diagnoser and write its bundle to ``out``; returns ``out``.

    With ``data`` (``--data LABELS --text-column COLUMN``) it trains on the user's labelled studies
    instead: :func:`hygeia_fusion._user_data.train_on_files`.

    Options (``hygeia train fusion --option KEY=VALUE``): ``n_train``, ``n_val``, ``batch_size``,
    ``lr``, ``text_dropout`` (share of training images with the text removed, so image-only mode is
    learnt too), ``text_shuffle`` (share of the others given another patient's text of the same
    batch, the labels kept: text that does not fit the image is learnt to count for less; 0),
    ``shift`` (max translation in px), ``mask_weight`` (weight of the localisation loss:
    evidence maps against the phantoms' finding masks; 0 = labels only), ``mask_pool`` (``avg``:
    area share per map cell, or ``max``: any overlap), ``mask_pos_weight``, ``mask_finding_weight``
    (a JSON object of finding -> weight of its map in the localisation loss, e.g. ``{"nodule": 4}``;
    the others 1: small findings cover few cells and count for little otherwise), ``mask_point_weight``
    (weight of :func:`pointing_loss`, which rewards each map's maximum landing on its finding; 0), ``size`` (phantom size
    in pixels, default 256), ``difficulty`` (phantom difficulty, default 2), ``mimics`` (the rate of
    look-alikes of absent findings, 0-1, :data:`hygeia_lab.phantoms.MIMIC_RATES`; 0), ``finer`` (evidence maps
    at half the input size, through a stem skip), ``refine`` (channels of a small conv head on the
    evidence-map grid, added to the per-location linear read-out and starting at zero; 0: none), ``init`` (a bundle to warm-start from: a fusion
    bundle, or an image-only diagnoser's such as ``cxr``, whose ResNet becomes the backbone),
    ``fine`` (evidence maps at a quarter of the input size), ``blocks``, ``widths``, ``stem``,
    ``mean``, ``std`` (the backbone's layout and input normalisation; ``cxr``'s at widths 16-128),
    ``baselines`` (also fit the text-only and late-fusion heads, :mod:`hygeia_fusion._baselines`),
    ``threads`` (CPU threads; 0: every core), ``width``, ``layers``, ``data_dir`` (cache phantom
    sets and text states there).

    ``stage=localiser`` (with ``init``, a fusion bundle) trains a localiser for one finding onto that
    bundle instead: :func:`hygeia_fusion._localiser.train_localiser` (its options are listed there).
    """
    stage = options.pop("stage", "fusion")
    if stage == "localiser":
        from ._localiser import train_localiser

        return train_localiser(out, seed, progress, epochs=epochs, device=device, **options)
    if stage != "fusion":
        raise InputError("option stage", "fusion (the default) or localiser", got=repr(stage))
    if options.get("data") is not None:  # the user's labelled studies (hygeia_fusion._user_data)
        from ._user_data import train_on_files

        return train_on_files(out, seed, progress, epochs=epochs, device=device, **options)
    options = {k: v for k, v in options.items() if k not in _FILE_OPTIONS or v is not None}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise InputError("option", f"one of {', '.join(sorted(DEFAULTS))}", got=", ".join(sorted(unknown)))
    check_option_values(options, DEFAULTS)
    o = {**DEFAULTS, **options}
    if o["mask_pool"] not in ("avg", "max"):  # checked before any data is drawn
        raise InputError("mask_pool", "'avg' or 'max'", got=repr(o["mask_pool"]))
    finding_weights(o["mask_finding_weight"])
    arch_config(o, len(FINDING_LABELS))  # the network options, checked before any data is drawn
    if float(o["mask_point_weight"]) < 0:
        raise InputError("option mask_point_weight", "a weight of 0 or more", got=repr(o["mask_point_weight"]))
    if epochs is not None:
        o["epochs"] = int(epochs)
    o["init"] = str(o["init"]) if o["init"] else None
    threads = torch.get_num_threads()
    if int(o["threads"]) > 0:  # 0: torch's default (every core)
        torch.set_num_threads(int(o["threads"]))
    try:
        return _train(out, seed, progress, o, data_dir, device, callback)
    finally:
        torch.set_num_threads(threads)


def _data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir``, else ``$HYGEIA_DATA_CACHE``, else None (no cache)."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ["HYGEIA_DATA_CACHE"]) if os.environ.get("HYGEIA_DATA_CACHE") else None


def shuffle_texts(s: torch.Tensor, m: torch.Tensor, dropped: torch.Tensor, share: float,
                  g: torch.Generator) -> torch.Tensor:
    """Give a ``share`` of the images that keep a text (not ``dropped``) another patient's text of
    the batch, in place (text states ``s`` and masks ``m``); the labels stay. Returns the rows changed
    (each takes the text of the previous one of them, so with two or more none keeps its own)."""
    wrong = ((torch.rand(len(s), generator=g) < share) & ~dropped).nonzero()[:, 0]
    if len(wrong) < 2:
        return wrong[:0]
    other = wrong.roll(1)
    s[wrong], m[wrong] = s[other], m[other]  # advanced indexing reads copies first
    return wrong


def _batch_loss(net: FusionNet, batch: Batch, o: dict[str, Any], g: torch.Generator, dev: torch.device) -> torch.Tensor:
    """The loss of one batch: findings BCE (+ ``mask_weight`` x evidence maps against the masks).

    ``batch``: images, labels, finding masks (None: labels only), text states, text masks, on the
    CPU. Draws from ``g`` in a fixed order: the translation and jitter, then the text dropout.
    """
    x, y, mk, s, m = batch
    x, mk = _augment(x, g, int(o["shift"]), mk)
    drop = torch.rand(len(x), generator=g) < float(o["text_dropout"])
    m[drop] = 0  # text removed: only the no-text token remains
    if float(o["text_shuffle"]) > 0:
        shuffle_texts(s, m, drop, float(o["text_shuffle"]), g)
    out = net(x.to(dev), s.to(dev), m.to(dev))
    loss = F.binary_cross_entropy_with_logits(out["logits"], y.to(dev))
    if mk is not None:  # localisation: evidence maps against the finding masks
        pool = F.adaptive_avg_pool2d if o["mask_pool"] == "avg" else F.adaptive_max_pool2d
        target = pool(mk.to(dev), out["maps"].shape[-2:])
        per_map = F.binary_cross_entropy_with_logits(
            out["maps"], target, pos_weight=torch.tensor(float(o["mask_pos_weight"]), device=dev), reduction="none")
        w = torch.tensor(finding_weights(o["mask_finding_weight"]), device=dev)
        loss = loss + float(o["mask_weight"]) * (per_map.mean((0, 2, 3)) * w).mean()
        if float(o["mask_point_weight"]) > 0:
            loss = loss + float(o["mask_point_weight"]) * pointing_loss(out["maps"], target)
    return loss


def _fit(net: FusionNet, tr: PhantomSet, va: PhantomSet, text: dict[str, tuple[torch.Tensor, ...]],
         o: dict[str, Any], g: torch.Generator, dev: torch.device, progress: bool, t0: float,
         callback: Callback | None) -> tuple[list[dict[str, Any]], int]:
    """Train ``net`` for ``o["epochs"]``; it ends holding the epoch with the best validation macro
    AUROC. Returns the per-epoch history and that epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    opt = torch.optim.AdamW(net.parameters(), lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
    bs, n = int(o["batch_size"]), len(tr)
    steps = int(o["epochs"]) * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(o["lr"]), total_steps=steps, pct_start=0.15)
    x_all, y_all = torch.from_numpy(tr.images), torch.from_numpy(tr.labels)
    m_all = torch.from_numpy(tr.masks) if float(o["mask_weight"]) > 0 else None
    (tr_s, tr_m, tr_i), (va_s, va_m, va_i) = text["train"], text["val"]
    best: tuple[float, dict[str, torch.Tensor], int] = (-1.0, {}, -1)
    history: list[dict[str, Any]] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task("training fusion", total=steps)
        for ep in range(int(o["epochs"])):
            net.train()
            perm = torch.randperm(n, generator=g)
            tot = 0.0
            for i in range(0, n, bs):
                j = perm[i:i + bs]
                mk = m_all[j].float() if m_all is not None else None
                ti = tr_i[j]
                loss = _batch_loss(net, (x_all[j], y_all[j], mk, tr_s[ti].float(), tr_m[ti].clone()), o, g, dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(j)
                bar.advance(task)
            auc = _aurocs(va.labels, _predict(net, va.images, va_s, va_m, va_i, dev))
            rec = {"epoch": ep + 1, "loss": tot / n, "val_macro_auroc": float(np.nanmean(auc)),
                   "val_auroc": dict(zip(FINDING_LABELS, [round(a, 4) for a in auc])),
                   "seconds": round(time.time() - t0, 1)}
            history.append(rec)
            bar.update(task, description=f"training fusion (epoch {ep + 1}, val AUROC {rec['val_macro_auroc']:.3f})")
            # one line per epoch, also in a log file where the bar is drawn only when it ends
            if progress:
                bar.console.print(f"epoch {ep + 1}/{o['epochs']}: train loss {rec['loss']:.4f}, validation macro AUROC "
                                  f"{rec['val_macro_auroc']:.4f}, {rec['seconds']:.0f} s", highlight=False)
            if callback is not None:
                callback(ep + 1, rec)
            if rec["val_macro_auroc"] > best[0]:
                best = (rec["val_macro_auroc"], copy.deepcopy(net.state_dict()), ep + 1)
    net.load_state_dict(best[1])
    return history, best[2]


def _save(out: str | Path, net: FusionNet, va: PhantomSet, text: tuple[torch.Tensor, ...], arch: dict[str, Any],
          o: dict[str, Any], seed: int, dev: torch.device, t0: float, history: list[dict[str, Any]],
          best_epoch: int, baselines: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, float]]) -> Path:
    """Thresholds and metrics on the validation split (with and without text), then the bundle."""
    size = int(o["size"])
    p_text = _predict(net, va.images, *text, dev)
    p_none = _predict(net, va.images, None, None, None, dev)
    metrics = {
        "val_macro_auroc": round(float(np.nanmean(_aurocs(va.labels, p_text))), 4),
        "val_macro_auroc_no_text": round(float(np.nanmean(_aurocs(va.labels, p_none))), 4),
        "val_per_finding_auroc": dict(zip(FINDING_LABELS, [round(a, 4) for a in _aurocs(va.labels, p_text)])),
        "best_epoch": best_epoch,
        **baselines[2],
    }
    config = {
        "architecture": arch,
        "findings": list(FINDING_LABELS),
        "input_size": [size, size],
        "thresholds": youden_thresholds(va.labels, p_text),
        "thresholds_no_text": youden_thresholds(va.labels, p_none),
        "threshold_rule": "Youden's J on the 'val' phantom split",
        "max_tokens": int(o["max_tokens"]),
        "text_encoder": {k: v for k, v in encoder_identity().items() if k != "path"},
        "text_encoder_frozen": True,
        "difficulty": float(o["difficulty"]),
        "mimics": float(o["mimics"]),
        **({"baselines": baselines[1]} if baselines[1] else {}),
        "training": {"seed": seed, **{k: o[k] for k in DEFAULTS}, "device": str(dev),
                     "seconds": round(time.time() - t0, 1), "history": history},
    }
    with torch.no_grad():
        maps = int(net(torch.zeros(1, 1, size, size, device=dev))["maps"].shape[-1])
    save_bundle(out, {**net.state_dict(), **baselines[0]}, config,
                card(metrics, int(o["n_train"]), maps, size, (float(o["difficulty"]), float(o["mimics"])),
                     _command(o, seed)))
    return Path(out)


def _command(o: dict[str, Any], seed: int) -> str:
    """The ``hygeia train fusion`` command that reproduces a run (options that differ from the defaults)."""
    opts = "".join(" --option " + shlex.quote(f"{k}={json.dumps(o[k]).replace(' ', '')}") for k in DEFAULTS
                   if k not in ("epochs", "init") and o[k] != DEFAULTS[k])
    init = f" --init {o['init']}" if o["init"] else ""
    return f"hygeia train fusion --seed {seed} --epochs {o['epochs']}{init}{opts}"


def _train(out: str | Path, seed: int, progress: bool, o: dict[str, Any], data_dir: str | Path | None,
           device: str | None, callback: Callback | None) -> Path:
    dev = pick_device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    cache = _data_dir(data_dir)
    size = int(o["size"])
    look = float(o["difficulty"]), float(o["mimics"])
    tr = _dataset("train", int(o["n_train"]), cache, progress, size, *look)
    va = _dataset("val", int(o["n_val"]), cache, progress, size, *look)
    text = {"train": _text_states(tr.texts, int(o["max_tokens"]), cache),
            "val": _text_states(va.texts, int(o["max_tokens"]), cache)}
    arch = arch_config(o, len(FINDING_LABELS))
    net = FusionNet(**{**arch, "widths": tuple(arch["widths"])}).to(dev)
    if o["init"]:  # warm start: every tensor of that bundle whose name and shape fit
        warm_start(net, o["init"], progress)
    history, best_epoch = _fit(net, tr, va, text, o, g, dev, progress, t0, callback)
    extra: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, float]] = ({}, {}, {})
    if o["baselines"]:  # text-only and late fusion, for the comparison table (hygeia_fusion._baselines)
        from ._train_baselines import fit_baselines

        extra = fit_baselines(arch, o["init"], net.state_dict(), (tr.images, va.images), (tr.labels, va.labels),
                              text, seed, dev, progress)
    return _save(out, net, va, text["val"], arch, o, seed, dev, t0, history, best_epoch, extra)
