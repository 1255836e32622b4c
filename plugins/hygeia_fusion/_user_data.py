"""Training the ``fusion`` diagnoser on the user's labelled studies and their clinical text.

``hygeia train fusion --data LABELS --text-column Indication [--init BUNDLE]``: the label file
(CheXpert-style or ChestX-ray14-style CSV, or MONAI datalist; :func:`hygeia.data.labels.read_labels`)
gives the findings and, in ``--text-column``, one clinical text per image. The bundle reports the
file's findings with their SNOMED CT codes. Rows are split by patient; images stream from disk;
:func:`hygeia_lab.training.fit` trains with class weights, masked BCE (blank and uncertain labels
ignored), early stopping on validation macro AUROC and checkpoints (``--resume``). The text
encoder stays frozen; a share of training images (``text_dropout``) loses its text so the image-only
mode is learnt too. ``--init`` warm-starts from a fusion bundle or an image-only diagnoser's
(``cxr``): every tensor whose name and shape fit; a backbone of other widths is refused.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hygeia.api import ModelCard
from hygeia.bundles import save_bundle
from hygeia.errors import InputError
from hygeia_lab.training import (FitConfig, codes_config, curve_png, export_command, fit, metrics_csv, phantom_export,
                                 split_label_file)

from .model import ARCH_DEFAULTS, FusionNet, arch_config, encode_texts, encoder_identity, warm_start

USER_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "size": 256, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "patience": 3, "workers": 2,
    "val_fraction": 0.2, "augment": False, "text_dropout": 0.3, "threads": None, "device": None, "max_tokens": 128,
}


class TextFusion(nn.Module):
    """``(images, texts) -> logits``: the frozen encoder's token states fed to a :class:`FusionNet`."""

    def __init__(self, net: FusionNet, max_tokens: int, text_dropout: float, seed: int) -> None:
        super().__init__()
        self.net, self.max_tokens, self.text_dropout = net, int(max_tokens), float(text_dropout)
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        if self.training and self.text_dropout > 0:
            drop = torch.rand(len(texts), generator=self.g) < self.text_dropout
            texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        states, mask = encode_texts(texts, self.max_tokens)
        return self.net(images, states.to(images.device), mask.to(images.device))["logits"]


def _options(options: dict[str, Any]) -> dict[str, Any]:
    allowed = set(USER_DEFAULTS) | set(ARCH_DEFAULTS)
    unknown = set(options) - allowed
    if unknown:
        raise InputError("train options with --data", f"some of {', '.join(sorted(allowed))}", got=", ".join(sorted(unknown)))
    o = {**ARCH_DEFAULTS, **USER_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("epochs", "size", "batch_size"):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
            raise InputError(key, "a positive integer", got=repr(o[key]))
    return o


def _card(table: Any, n: tuple[int, int], res: Any, o: dict[str, Any], seed: int, text_column: str) -> ModelCard:
    hist = res.history[res.best_epoch - 1] if res.history else {}
    names = ", ".join(table.findings)
    phantoms = phantom_export(table)
    if phantoms is not None:
        origin = (f"synthetic phantoms (to reproduce: `{export_command(phantoms)}` then `hygeia train fusion --data "
                  f"DIR/{phantoms.get('label_file')} --text-column {text_column} --epochs {o['epochs']} --seed {seed}`)")
    else:
        origin = f"{table.source.name if table.source is not None else 'labels'} ({table.layout} layout)"
    return ModelCard(
        intended_use=(f"A research model trained with `hygeia train fusion --data`: flags {names} from an image and its "
                      "clinical text. Not for clinical use without local validation."),
        training_data=(f"{n[0]} images of {origin} for training and {n[1]} for validation, split by patient; text from "
                       f"column {text_column!r}; {o['size']} px; seed {seed}; best epoch {res.best_epoch} of {len(res.history)}."),
        metrics={"val_macro_auroc": round(float(res.best_auroc), 4), "best_epoch": res.best_epoch,
                 "val_auroc": {f: round(float(hist.get(f"val_auroc_{j}", float("nan"))), 4) for j, f in enumerate(table.findings)}},
        limitations=("Validation AUROC is on held-out patients of the same file; evaluate on an independent set with "
                     "`hygeia evaluate diagnoser fusion --bundle ... --data ... --text-column ...`. The frozen text "
                     "encoder (all-MiniLM-L6-v2) reads English; text past max_tokens is truncated."))


def train_on_files(out: str | Path, seed: int, progress: bool, data: str | Path, image_root: str | Path | None = None,
                   codes: str | Path | None = None, uncertain: str | None = None, text_column: str | None = None,
                   init: str | Path | None = None, resume: bool = False, **options: Any) -> Path | None:
    """Train on the label file ``data`` with its text column; write the bundle to ``out`` (None on DDP ranks > 0)."""
    if not text_column:
        raise InputError("--text-column", "the label file's column with clinical text (the fusion diagnoser reads text)")
    o = _options(options)
    if o["threads"]:
        torch.set_num_threads(int(o["threads"]))
    t0 = time.time()
    table, train_t, val_t = split_label_file(data, image_root, uncertain, text_column, codes, o["val_fraction"], seed,
                                             progress)
    arch = arch_config(o, len(table.findings))
    torch.manual_seed(seed)
    net = FusionNet(**{**arch, "widths": tuple(arch["widths"]), "blocks": tuple(arch["blocks"])})
    if init is not None:
        warm_start(net, init, progress)
    model = TextFusion(net, o["max_tokens"], o["text_dropout"], seed)
    cfg = FitConfig.from_options(o, seed=seed, resume=bool(resume), progress=progress,
                                 pos_weight=train_t.pos_weight().tolist(), text=True)
    res = fit(model, train_t.rows, val_t.rows, Path(out), cfg)
    if res is None:
        return None
    state = {k[len("net."):]: v for k, v in res.state_dict.items() if k.startswith("net.")}
    config = {
        "architecture": arch, "findings": list(table.findings), "codes": codes_config(table),
        "input_size": [o["size"], o["size"]], "thresholds": [float(t) for t in res.thresholds],
        "thresholds_no_text": [float(t) for t in (res.thresholds_no_text or res.thresholds)],
        "threshold_rule": "Youden's J on the validation patients (with their text; without text for thresholds_no_text)",
        "max_tokens": int(o["max_tokens"]),
        "text_encoder": {k: v for k, v in encoder_identity().items() if k != "path"}, "text_encoder_frozen": True,
        "data": {"file": str(table.source.name if table.source else data), "layout": table.layout,
                 "text_column": text_column, "n_train": len(train_t), "n_val": len(val_t),
                 "init": str(init) if init else None},
        "training": {"seed": seed, **{k: (v if isinstance(v, (int, float, list, type(None))) else str(v)) for k, v in o.items()},
                     "seconds": round(time.time() - t0, 1), "best_epoch": res.best_epoch},
    }
    files = {"metrics.csv": metrics_csv(res.history, table.findings),
             "training_curve.png": curve_png(res.history, f"fusion on {config['data']['file']}")}
    save_bundle(out, state, config, _card(table, (len(train_t), len(val_t)), res, o, seed, text_column), extra=files)
    return Path(out)
