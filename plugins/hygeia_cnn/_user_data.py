"""Training the ``cnn`` on the user's labelled studies (``hygeia train cnn --data LABELS``).

The label file (CheXpert-style CSV, ChestX-ray14-style CSV or MONAI datalist; read by
:func:`hygeia.data.labels.read_labels`) gives the findings: the bundle reports the user's columns,
each with its SNOMED CT code (built-in table or ``--codes``). The rows are split by patient, the
images stream from disk, and :func:`hygeia_lab.training.fit` trains the network with class
weights, early stopping on validation macro AUROC and checkpoints (``--resume``). The bundle is
written once, at the end, with ``metrics.csv`` and ``training_curve.png`` beside the weights.
``--init BUNDLE`` fine-tunes from a bundle: every tensor whose name and shape match is loaded (a
different label set keeps the backbone and trains a new output layer).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hygeia.api import ModelCard
from hygeia.bundles import load_bundle, save_bundle
from hygeia.data.labels import LabelTable
from hygeia.errors import InputError
from hygeia.validation import check_option_values
from hygeia_lab.training import (FitConfig, codes_config, curve_png, export_command, fit, metrics_csv, phantom_export,
                                 split_label_file)

from .model import ARCH_256, DEFAULT_ARCH, CnnNet
from .plugin import CARD, VERSION

USER_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "size": 256, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "patience": 3, "workers": 2,
    "val_fraction": 0.2, "augment": False, "threads": None, "device": None, "arch": None, "precision": "float32",
}


def _user_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(USER_DEFAULTS)
    if unknown:
        raise InputError("train options with --data", f"some of {', '.join(sorted(USER_DEFAULTS))}",
                         got=", ".join(sorted(unknown)))
    o = {**USER_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("epochs", "size", "batch_size"):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
            raise InputError(key, "a positive integer", got=repr(o[key]))
    if not 32 <= o["size"] <= 1024:
        raise InputError("size", "an image size from 32 to 1024 pixels", got=o["size"])
    return o


def _init_from(net: CnnNet, init: str | Path) -> str:
    """Load every tensor of the bundle ``init`` whose name and shape match ``net``'s; a summary line."""
    b = load_bundle(init)
    own = net.state_dict()
    take = {k: v for k, v in b.tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not take:
        raise InputError(f"--init bundle {str(init)!r}", "a cnn bundle with the same network", got="no matching tensor")
    net.load_state_dict(take, strict=False)
    return f"initialised {len(take)} of {len(own)} tensors from {init} (weights {b.sha256[:12]})"


def _config(table: LabelTable, arch: dict[str, Any], o: dict[str, Any], thresholds: list[float], seed: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    return {"arch": arch, "findings": list(table.findings), "codes": codes_config(table), "input_size": [o["size"], o["size"]],
            "thresholds": [float(t) for t in thresholds], "version": VERSION, "seed": seed,
            "training": {k: (None if v is None else (v if isinstance(v, (int, float, dict)) else str(v)))
                         for k, v in o.items()}, **extra}


def _command(plugin: str, phantoms: dict[str, Any], o: dict[str, Any], seed: int) -> str:
    """The commands that rebuild this bundle from the repository alone (a phantom export, then training)."""
    exp = export_command(phantoms)
    extra = "".join(f" --option {k}={o[k]}" for k in ("size", "batch_size", "lr", "weight_decay", "patience", "val_fraction",
                                                     "precision")
                    if o[k] != USER_DEFAULTS[k])
    return f"`{exp}` then `hygeia train {plugin} --data DIR/{phantoms.get('label_file')} --epochs {o['epochs']} --seed {seed}{extra}`"


def _card(table: LabelTable, n_train: int, n_val: int, res: Any, o: dict[str, Any], seed: int,
          plugin: str = "cnn") -> ModelCard:
    hist = res.history[res.best_epoch - 1] if res.history else {}
    per = {f: round(float(hist.get(f"val_auroc_{j}", float("nan"))), 4) for j, f in enumerate(table.findings)}
    src = table.source.name if table.source is not None else "labels"
    names = ", ".join(table.findings)
    phantoms = phantom_export(table)
    if phantoms is not None:
        settings = {k: phantoms.get(k) for k in ("layout", "n", "size", "format", "split", "seed", "difficulty")}
        use = (f"Demonstration diagnoser for the Hygeia SDK: flags {names} on synthetic chest-radiograph phantoms. "
               "Not for clinical use.")
        origin = (f"synthetic phantoms exported by `hygeia phantoms export` ({settings}; to reproduce: "
                  f"{_command(plugin, phantoms, o, seed)})")
    else:
        use = (f"A research model trained on the user's own labelled studies with `hygeia train --data`: flags {names}. "
               "Its validity is the user's to establish; not for clinical use without local validation.")
        origin = f"{src} ({table.layout} layout)"
    return ModelCard(
        intended_use=use,
        training_data=(f"{n_train} images of {origin} for training and {n_val} for validation, split by patient; "
                       f"{o['size']} px; seed {seed}; best of {len(res.history)} epochs: {res.best_epoch}."),
        metrics={"val_macro_auroc": round(float(res.best_auroc), 4), "val_auroc": per, "best_epoch": res.best_epoch,
                 "n_train": n_train, "n_val": n_val},
        limitations=("Validation AUROC is measured on held-out patients of the same label file; evaluate on an "
                     "independent set with `hygeia evaluate diagnoser NAME --bundle ... --data ...`. "
                     "Image-only (ignores clinical text)."),
        license=CARD.license)


def train_on_files(out: str | Path, seed: int, progress: bool, data: str | Path, image_root: str | Path | None = None,
                   codes: str | Path | None = None, uncertain: str | None = None, text_column: str | None = None,
                   init: str | Path | None = None, resume: bool = False, plugin: str = "cnn",
                   **options: Any) -> Path | None:
    """Train on the label file ``data`` and write the bundle to ``out``; None on DDP ranks other than 0."""
    o = _user_options(options)
    check_option_values({"arch": o["arch"]}, {"arch": DEFAULT_ARCH})
    if o["threads"]:
        torch.set_num_threads(int(o["threads"]))
    t0 = time.time()
    table, train_t, val_t = split_label_file(data, image_root, uncertain, text_column, codes, o["val_fraction"], seed,
                                             progress)
    arch = {**(ARCH_256 if o["size"] >= 128 else DEFAULT_ARCH), **(o["arch"] or {})}
    torch.manual_seed(seed)
    net = CnnNet(arch, n_out=len(table.findings))
    note = _init_from(net, init) if init is not None else "trained from scratch"
    cfg = FitConfig.from_options(o, seed=seed, resume=bool(resume), progress=progress,
                                 pos_weight=train_t.pos_weight().tolist())
    out = Path(out)
    res = fit(net, train_t.rows, val_t.rows, out, cfg)  # a LabelRow has the fields of an Item
    if res is None:
        return None
    extra = {"data": {"file": str(table.source.name if table.source else data), "layout": table.layout,
                      "n_train": len(train_t), "n_val": len(val_t), "init": note},
             "best_epoch": res.best_epoch, "best_val_macro_auroc": round(float(res.best_auroc), 6),
             "train_seconds": round(time.time() - t0, 1)}
    config = _config(table, arch, o, res.thresholds, seed, extra)
    files = {"metrics.csv": metrics_csv(res.history, table.findings),
             "training_curve.png": curve_png(res.history, f"cnn on {extra['data']['file']}")}
    save_bundle(out, res.state_dict, config, _card(table, len(train_t), len(val_t), res, o, seed, plugin), extra=files)
    return out
