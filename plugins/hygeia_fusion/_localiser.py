"""The localiser stage of the fusion trainer (``hygeia train fusion --option stage=localiser``).

The fusion network's evidence maps are trained to explain the findings' probabilities; for a small
nodule their peak often lands on another bright structure (the hilum, a vessel crossing) whose
evidence is nearly as high. The localiser answers one question only: given that the finding is
present, where is it? It is a small MONAI UNet on the image alone
(:func:`hygeia_fusion.model.localiser_net`), trained with :func:`~hygeia_fusion._losses.pointing_loss`
(a softmax over the map cells, ``-log`` of its mass inside the finding's mask) on phantoms that all
show the finding. Its output replaces that finding's evidence map in the network's ``maps``, so the
heat map, the point region, the frozen graphs and the Triton model all use it; the probabilities
still come from the fusion head, unchanged.

The stage starts from a fusion bundle (``init``) and keeps everything else in it: the network's
weights, the thresholds, the baselines and the model card's metrics.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_option_values
from hygeia.vocab import FINDING_LABELS

from hygeia_lab.evaluation.diagnosers import NEAR_PX, NEAR_SCALE  # the evaluation's hit tolerance

from ._losses import pointing_loss
from .model import FusionNet

LOCALISER_DEFAULTS: dict[str, Any] = {
    "init": None, "finding": "nodule", "channels": [8, 16, 32, 64, 128], "n_train": 6000, "n_val": 600,
    "batch_size": 16, "lr": 0.002, "shift": 8, "paired": 0.4, "threads": 0,
}
"""Options of the localiser stage: ``finding`` to localise; ``channels`` of the UNet's levels;
``n_train`` / ``n_val`` phantoms that all show the finding (a share ``paired`` of them with one
other finding too); ``shift`` (max translation in px); ``lr`` (peak of a one-cycle schedule)."""
BASELINES = "baselines."


def train_localiser(out: str | Path, seed: int = 0, progress: bool = True, epochs: int | None = None,
                    device: str | None = None, **options: Any) -> Path:
    """Train a localiser onto the fusion bundle ``init`` and write the result to ``out``; returns ``out``."""
    unknown = set(options) - set(LOCALISER_DEFAULTS)
    if unknown:
        raise InputError("option", f"with stage=localiser, one of {', '.join(sorted(LOCALISER_DEFAULTS))}",
                         got=", ".join(sorted(unknown)))
    check_option_values(options, LOCALISER_DEFAULTS)
    o = {**LOCALISER_DEFAULTS, **options, "epochs": int(epochs) if epochs is not None else 5}
    if o["epochs"] < 1 or min(int(o["n_train"]), int(o["n_val"]), int(o["batch_size"])) < 1:
        raise InputError("option", "epochs, n_train, n_val and batch_size of 1 or more",
                         got=f"{o['epochs']}, {o['n_train']}, {o['n_val']}, {o['batch_size']}")
    if not o["init"]:
        raise InputError("option init", "the fusion bundle the localiser is added to (--init BUNDLE)", got="none")
    o["init"] = str(o["init"])
    b = load_bundle(o["init"])
    findings = list(b.config.get("findings", FINDING_LABELS))
    if o["finding"] not in findings or o["finding"] not in FINDING_LABELS:  # phantoms draw FINDING_LABELS only
        ok = [f for f in findings if f in FINDING_LABELS]
        raise InputError("option finding", f"one of the bundle's phantom findings ({', '.join(ok)})",
                         got=repr(o["finding"]))
    arch = {**b.config["architecture"], "localise": findings.index(o["finding"]),
            "localiser_channels": [int(c) for c in o["channels"]]}
    torch.manual_seed(seed)  # the localiser's initial weights, then the order of the batches
    net = FusionNet(**{**arch, "widths": tuple(arch["widths"])})
    # everything but the baselines and an earlier localiser (which is replaced)
    keep = {k: v for k, v in b.tensors.items() if not k.startswith((BASELINES, "localiser."))}
    missing, _ = net.load_state_dict(keep, strict=False)
    if any(not k.startswith("localiser.") for k in missing):
        raise InputError(f"--init bundle {str(o['init'])!r}", "a fusion bundle", got=f"no tensor {missing[0]}")
    dev = pick_device(device)
    threads = torch.get_num_threads()
    if int(o["threads"]) > 0:
        torch.set_num_threads(int(o["threads"]))
    try:
        t0 = time.time()
        size = int(b.config.get("input_size", [256, 256])[0])
        look = float(b.config.get("difficulty", 0.5)), float(b.config.get("mimics", 0.0))
        tr = _phantoms("train", int(o["n_train"]), o["finding"], float(o["paired"]), size, look, progress)
        va = _phantoms("val", int(o["n_val"]), o["finding"], float(o["paired"]), size, look, progress)
        net.to(dev).eval()  # the fusion network's BatchNorm statistics stay the init bundle's
        with torch.no_grad():
            side = int(net(torch.zeros(1, 1, size, size, device=dev))["maps"].shape[-1])  # the evidence-map grid
        history = _fit(net, tr, va, o, seed, dev, progress, side)
    finally:
        torch.set_num_threads(threads)
    best = max(history, key=lambda r: r["val_hit_rate"])
    config = {**b.config, "architecture": arch,
              "localiser_training": {"seed": seed, **{k: o[k] for k in LOCALISER_DEFAULTS}, "epochs": o["epochs"],
                                     "device": str(dev), "seconds": round(time.time() - t0, 1), "history": history}}
    card = dataclasses.replace(
        b.card, metrics={**b.card.metrics, f"val_localiser_{o['finding']}_within_{NEAR_PX}px_at_{NEAR_SCALE}":
                         best["val_hit_rate"], "val_localiser_phantoms": int(o["n_val"])},
        training_data=(_before_localiser(b.card.training_data, o["finding"])
                       + f"; then the {o['finding']} localiser: `{command(o, seed)}`."),
        limitations=_limitations(b.card.limitations, o["finding"]))
    tensors = {**{k: v.detach().cpu() for k, v in net.state_dict().items()},
               **{k: v for k, v in b.tensors.items() if k.startswith(BASELINES)}}
    save_bundle(out, tensors, config, card)
    return Path(out)


def _before_localiser(text: str, finding: str) -> str:
    """The card's training data without a localiser stage already recorded there (it is replaced)."""
    return text.split(f"; then the {finding} localiser: `")[0].rstrip(".")


def _limitations(text: str, finding: str) -> str:
    """The card's limitations with the localiser's (once, however often the stage is run)."""
    note = (f"The {finding} heat map comes from a localiser trained only on images that show a {finding}: "
            f"it points where one most likely is even when there is none; read it for a {finding} called present.")
    return text if note in text else f"{text.rstrip()} {note}".strip()


def command(o: dict[str, Any], seed: int) -> str:
    """The command that reproduces a localiser stage (options that differ from the defaults)."""
    opts = "".join(" --option " + shlex.quote(f"{k}={json.dumps(o[k]).replace(' ', '')}") for k in LOCALISER_DEFAULTS
                   if k not in ("init",) and o[k] != LOCALISER_DEFAULTS[k])
    return f"hygeia train fusion --option stage=localiser --init {o['init']} --seed {seed} --epochs {o['epochs']}{opts}"


def _phantoms(split: str, n: int, finding: str, paired: float, size: int, look: tuple[float, float],
              progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """``n`` phantoms of ``split`` that all show ``finding`` (a share ``paired`` with one other finding
    too, spread evenly), from patient 20,000 on; images ``[N,1,H,W]`` and the finding's masks ``[N,1,H,W]``."""
    from hygeia_lab.phantoms import make_phantom_set

    others = [f for f in FINDING_LABELS if f != finding]
    n_pair = int(round(n * paired)) // len(others)
    groups = [([finding], n - n_pair * len(others))] + [([finding, f], n_pair) for f in others]
    images, masks, start = [], [], 20000
    k = list(FINDING_LABELS).index(finding)
    for fs, m in groups:
        if m <= 0:
            continue
        if progress:
            print(f"localiser data: {m} {split} phantoms with {' + '.join(fs)}", flush=True)
        ps = make_phantom_set(m, split, size=size, difficulty=look[0], mimics=look[1], findings=fs, start=start,
                              workers=2)
        images.append(ps.images)
        masks.append(ps.masks[:, k:k + 1])
        start += m
    return np.concatenate(images), np.concatenate(masks)


def hit_rate(net: FusionNet, images: np.ndarray, masks: np.ndarray, dev: torch.device, side: int,
             batch: int = 32) -> float:
    """Share of images whose localiser map peaks within 2 px (at 128 px) of the finding's mask."""
    from scipy import ndimage

    size = images.shape[-1]
    px = NEAR_PX * size / NEAR_SCALE
    hits = 0
    net.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(dev)
            m = F.interpolate(net.localise_map(x, side), size=(size, size), mode="bilinear", align_corners=False)
            peaks = m.flatten(1).argmax(1).cpu().numpy()
            for j, p in enumerate(peaks):
                r, c = divmod(int(p), size)
                hits += bool(ndimage.distance_transform_edt(~masks[i + j, 0])[r, c] <= px)
    return hits / len(images)


def _fit(net: FusionNet, tr: tuple[np.ndarray, np.ndarray], va: tuple[np.ndarray, np.ndarray], o: dict[str, Any],
         seed: int, dev: torch.device, progress: bool, side: int) -> list[dict[str, Any]]:
    """Train the localiser only (the rest of the network is frozen); keep the epoch with the best hit rate."""
    import copy

    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.localiser.parameters())
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    x_all, m_all = torch.from_numpy(tr[0]), torch.from_numpy(tr[1])
    bs, pool = int(o["batch_size"]), tr[0].shape[-1] // side
    per_epoch = len(x_all) // bs
    opt = torch.optim.AdamW(params, float(o["lr"]), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, float(o["lr"]), total_steps=max(2, o["epochs"] * per_epoch),
                                                pct_start=0.1)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] = (-1.0, {})
    net.eval()
    net.localiser.train()  # only the localiser learns; the rest stays in inference mode
    t0 = time.time()
    for ep in range(o["epochs"]):
        perm, total = torch.randperm(len(x_all), generator=g), 0.0
        for i in range(per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            dy, dx = (int(v) for v in torch.randint(-int(o["shift"]), int(o["shift"]) + 1, (2,), generator=g))
            x = torch.roll(x_all[idx], (dy, dx), (2, 3)).to(dev)
            m = torch.roll(m_all[idx], (dy, dx), (2, 3)).to(dev).float()
            gain = 0.9 + 0.2 * torch.rand(len(x), 1, 1, 1, generator=g).to(dev)
            x = x * gain + 0.05 * (torch.rand(len(x), 1, 1, 1, generator=g).to(dev) - 0.5)
            loss = pointing_loss(net.localise_map(x, side), F.max_pool2d(m, pool) if pool > 1 else m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        rate = hit_rate(net, va[0], va[1], dev, side)
        net.localiser.train()
        history.append({"epoch": ep + 1, "loss": round(total / max(1, per_epoch), 4), "val_hit_rate": round(rate, 4),
                        "seconds": round(time.time() - t0, 1)})
        if progress:
            print(f"localiser epoch {ep + 1}/{o['epochs']}: loss {history[-1]['loss']:.3f}, "
                  f"val hit rate {rate:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if rate > best[0]:
            best = (rate, copy.deepcopy(net.localiser.state_dict()))
    net.localiser.load_state_dict(best[1])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    return history
