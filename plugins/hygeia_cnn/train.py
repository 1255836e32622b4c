"""Reproducible training of the ``cnn`` diagnoser (``hygeia train cnn``): on phantoms, or on the
user's labelled studies with ``--data`` (:mod:`hygeia_cnn._user_data`).

Phantoms: train split: fit; val split: per-finding thresholds (Youden's J); test split: the AUROC recorded in
the model card. The same seed, options and phantom code give the same weights (CPU). The plugin's
spec names :func:`train` as ``"hygeia_cnn.train:train"``: this module (and the lab it uses) is
imported only when training starts.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia.api import ModelCard
from hygeia.bundles import pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_option_values
from hygeia.vocab import FINDING_LABELS
from hygeia_lab import DEFAULT_DIFFICULTY, PhantomSet, load_npz, make_phantom_set, save_npz
from hygeia_lab import phantoms as _phantoms

from .model import DEFAULT_ARCH, CnnNet
from .plugin import CARD, CXR_WEIGHTS, VERSION, WEIGHTS, CnnDiagnoser

INPUT_SIZE = (64, 64)  # the phantom trainer's size; --data trains at 256 px by default

DEFAULTS: dict[str, Any] = {
    "epochs": 5, "n_train": 40000, "n_val": 2000, "n_test": 2000, "batch_size": 64, "lr": 3e-3,
    "weight_decay": 1e-4, "difficulty": DEFAULT_DIFFICULTY, "threads": 1, "cache_dir": None, "device": None,
    "shift": 3,
}


def _phantom_code_hash() -> str:
    return _phantoms.code_hash()[:12]


def phantom_data(split: str, n: int, difficulty: float, progress: bool, cache_dir: str | Path | None) -> PhantomSet:
    """A phantom split, cached as .npz under ``cache_dir`` (keyed by the phantom code's hash)."""
    if cache_dir is None:
        return make_phantom_set(n, split, size=INPUT_SIZE[0], difficulty=difficulty, progress=progress)
    p = Path(cache_dir) / f"{split}_{n}_{INPUT_SIZE[0]}_{difficulty:g}_{_phantom_code_hash()}.npz"
    if p.is_file():
        return load_npz(p)
    ps = make_phantom_set(n, split, size=INPUT_SIZE[0], difficulty=difficulty, progress=progress)
    save_npz(p, ps)
    return ps


def youden_thresholds(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per-finding threshold maximising sensitivity + specificity - 1 on a validation split.

    Every threshold between the best ROC point's score and the next lower score classifies the
    validation split alike; the midpoint of that gap is taken, not its upper end (the lowest
    positive score where the classes separate fully), which would overfit the validation split.
    """
    from sklearn.metrics import roc_curve

    out = []
    for k in range(labels.shape[1]):
        fpr, tpr, thr = roc_curve(labels[:, k], probs[:, k], drop_intermediate=False)
        j = int(np.argmax(tpr - fpr))
        t = thr[j] if j + 1 == len(thr) or not np.isfinite(thr[j]) else 0.5 * (thr[j] + thr[j + 1])
        out.append(float(np.float32(np.clip(t, 1e-4, 1.0))))  # exact in float32, as served over Triton
    return out


def _augment(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    """Small random translations and exposure changes (no flips: laterality matters)."""
    b, _, h, w = x.shape
    if shift:
        pad = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    c = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 2
    o = 0.03 * torch.randn(b, 1, 1, 1, generator=g)
    return ((x - 0.5) * c + 0.5 + o).clamp(0, 1)


def _options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The network config and the trainer options (defaults filled in), checked."""
    check_option_values({"arch": options.get("arch")}, {"arch": DEFAULT_ARCH})
    arch = {**DEFAULT_ARCH, **(options.pop("arch", None) or {})}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise InputError("train options", f"some of {', '.join(sorted(DEFAULTS))} or arch", got=", ".join(sorted(unknown)))
    check_option_values(options, DEFAULTS)
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if int(o["epochs"]) < 1:
        raise InputError("epochs", "a positive integer", got=int(o["epochs"]))
    return arch, o


def _probs(net: CnnNet, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Probabilities ``[N, 5]`` of ``net`` (switched to eval mode) on ``images``, 512 at a time."""
    net.eval()
    with torch.no_grad():
        xv = torch.from_numpy(images)
        return torch.cat([torch.sigmoid(net(xv[i:i + 512].to(device))).cpu()
                          for i in range(0, len(xv), 512)]).numpy()


def _fit(net: CnnNet, train_set: PhantomSet, val_set: PhantomSet, o: dict[str, Any], seed: int,
         device: torch.device, progress: bool, t0: float) -> None:
    """AdamW + one-cycle on BCE, shuffled and augmented from ``seed``; logs val AUROC per epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from sklearn.metrics import roc_auc_score

    epochs, bs = int(o["epochs"]), int(o["batch_size"])
    x_all = torch.from_numpy(train_set.images)
    y_all = torch.from_numpy(train_set.labels)
    opt = torch.optim.AdamW(net.parameters(), lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
    steps_per_epoch = len(x_all) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(o["lr"]), total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("training cnn", total=epochs * steps_per_epoch)
        for ep in range(epochs):
            net.train()
            perm = torch.randperm(len(x_all), generator=g)
            run = 0.0
            for s in range(steps_per_epoch):
                idx = perm[s * bs:(s + 1) * bs]
                xb = _augment(x_all[idx], g, int(o["shift"])).to(device)
                yb = y_all[idx].to(device)
                loss = loss_fn(net(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lv = loss.item()
                run = 0.98 * run + 0.02 * lv if s else lv
                bar.update(task, advance=1, description=f"training cnn: epoch {ep + 1}/{epochs} loss {run:.4f}")
            if progress:
                pv = _probs(net, val_set.images, device)
                auc = [roc_auc_score(val_set.labels[:, k], pv[:, k]) for k in range(len(FINDING_LABELS))]
                bar.console.log(f"epoch {ep + 1}/{epochs}: loss {run:.4f}, val AUROC "
                                + ", ".join(f"{lab} {a:.3f}" for lab, a in zip(FINDING_LABELS, auc))
                                + f", macro {np.mean(auc):.3f} ({time.time() - t0:.0f} s)")


def _test_metrics(out: Path, device: torch.device, o: dict[str, Any], thresholds: list[float], train_s: float,
                  progress: bool) -> dict[str, Any]:
    """The model card's metrics: the bundle at ``out`` on the held-out ``test`` split."""
    from hygeia_lab.evaluation.diagnosers import evaluate

    test_set = phantom_data("test", int(o["n_test"]), float(o["difficulty"]), progress, o["cache_dir"])
    res = evaluate(CnnDiagnoser(out, device=str(device), heatmaps=False), test_set, localisation=False)
    return {
        "test_auroc": {k: round(v["auroc"], 4) for k, v in res["per_finding"].items()},
        "test_macro_auroc": round(res["macro_auroc"], 4),
        "test_sensitivity": {k: round(v["sensitivity"], 4) for k, v in res["per_finding"].items()},
        "test_specificity": {k: round(v["specificity"], 4) for k, v in res["per_finding"].items()},
        "n_test": res["n"], "test_split": "test", "difficulty": float(o["difficulty"]),
        "thresholds_youden_val": dict(zip(FINDING_LABELS, [round(t, 4) for t in thresholds])),
        "train_seconds": round(train_s, 1),
    }


def _card(o: dict[str, Any], seed: int, metrics: dict[str, Any]) -> ModelCard:
    return ModelCard(intended_use=CARD.intended_use,
                     training_data=(f"{o['n_train']} synthetic 64x64 phantoms (hygeia_lab.phantoms, split 'train', difficulty "
                                    f"{o['difficulty']}), {int(o['epochs'])} epochs, seed {seed}; thresholds on {o['n_val']} "
                                    f"'val' phantoms; metrics on {o['n_test']} 'test' phantoms (seeds never used in training)."),
                     metrics=metrics, limitations=CARD.limitations, license=CARD.license)


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, **options: Any) -> Path:
    """Train the cnn and write its bundle atomically to ``out``; returns ``out``.

    With ``data=LABELS`` (``--data``) it trains on the user's labelled studies: see
    :func:`hygeia_cnn._user_data.train_on_files` for those options (image_root, codes, uncertain,
    text_column, init, resume, size, ...). Otherwise on 64 px phantoms generated in memory, with
    the options (defaults in :data:`DEFAULTS`): epochs, n_train, n_val, n_test, batch_size, lr,
    weight_decay, difficulty, threads, cache_dir (reuse generated phantoms), device, shift, arch
    (overrides of :data:`~hygeia_cnn.model.DEFAULT_ARCH`).
    """
    if options.get("data") is not None:
        from ._user_data import train_on_files

        return train_on_files(out, seed, progress, **options)
    arch, o = _options(options)
    t0 = time.time()
    torch.set_num_threads(int(o["threads"]))
    torch.manual_seed(seed)
    device = pick_device(o["device"])
    train_set = phantom_data("train", int(o["n_train"]), float(o["difficulty"]), progress, o["cache_dir"])
    val_set = phantom_data("val", int(o["n_val"]), float(o["difficulty"]), progress, o["cache_dir"])
    net = CnnNet(arch).to(device)
    _fit(net, train_set, val_set, o, seed, device, progress, t0)
    thresholds = youden_thresholds(val_set.labels, _probs(net, val_set.images, device))
    train_s = time.time() - t0
    config = {"arch": arch, "thresholds": thresholds, "findings": list(FINDING_LABELS), "input_size": list(INPUT_SIZE),
              "version": VERSION, "seed": seed,
              "training": {k: (str(v) if k in ("cache_dir", "device") else v) for k, v in o.items()},
              "phantom_code_sha256_12": _phantom_code_hash(), "train_seconds": round(train_s, 1)}
    out = Path(out)
    save_bundle(out, net.state_dict(), config, CARD)
    metrics = _test_metrics(out, device, o, thresholds, train_s, progress)  # held-out test split
    save_bundle(out, net.state_dict(), config, _card(o, seed, metrics))
    return out


def train_cxr(out: str | Path = CXR_WEIGHTS, seed: int = 0, progress: bool = True, **options: Any) -> Path | None:
    """Train the ``cxr`` diagnoser (256 px) on a label file, ``data=LABELS`` (``--data``).

    The shipped bundle was trained on a phantom export (its model card gives the commands); the
    options are those of :func:`hygeia_cnn._user_data.train_on_files`.
    """
    if options.get("data") is None:
        raise InputError("--data", "a label file: cxr trains on labelled images (for phantoms: `hygeia phantoms "
                         "export --layout datalist -n 6000 --format png --out DIR`, then --data DIR/dataset.json)")
    from ._user_data import train_on_files

    return train_on_files(out, seed, progress, plugin="cxr", **options)
