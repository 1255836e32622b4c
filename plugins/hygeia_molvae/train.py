"""The ``molecule-vae`` trainer (``hygeia train molecule-vae``), on MOSES or a SMILES file of your own.

Loss: the reconstruction cross-entropy plus the KL with free bits (Kingma et al. 2016): the KL of
each latent dimension, averaged over the batch, costs at least ``free_bits`` nats, so the
optimiser gains nothing by pushing it lower and the latent never collapses to KL = 0 (a plain KL
ramp did). The end-of-training KL is recorded in the model card. During training each property
is hidden at random (flag 0), so the same model samples unconditionally, with some targets, or
with all four. Checkpoints (model, Adam state, data position, RNG state) are safetensors + JSON.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hygeia.bundles import pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_seed

from ._bundle import WEIGHTS, make_card
from ._data import Batches, Prepared, load_training_smiles, prepare
from .model import SPECIALS, MoleculeVAE, VAEConfig


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, epochs: int = 1,
          resume: bool = False, data: str | Path | None = None, max_molecules: int | None = None,
          batch_size: int = 128, lr: float = 1e-3, free_bits: float = 0.1, beta: float = 1.0,
          cond_drop: float = 0.3, max_minutes: float | None = None, checkpoint_every: int = 500,
          val_size: int = 2000, device: str | None = None, workers: int = 1,
          checkpoints: str | Path | None = None, embed: int = 64, enc_hidden: int = 128,
          dec_hidden: int = 256, dec_layers: int = 1, latent: int = 64, max_len: int = 100,
          threads: int | None = None, init: str | Path | None = None) -> Path:
    """Train the molecule VAE and write a bundle to ``out`` (the best checkpoint by validation loss).

    Checkpoints (model, Adam state, data position, RNG state; safetensors + JSON) go to
    ``checkpoints`` (default ``OUT.ckpt/``) every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues from the last one. ``max_minutes`` stops cleanly after that much
    wall time. ``data``: 'moses' (default) or a .smi/.csv file; invalid SMILES are skipped and
    counted (``config.json`` -> ``training.skipped``). ``init``: a molecule-vae bundle to continue
    training from (its network and vocabulary; tokens outside that vocabulary become ``<unk>``).
    """
    seed = check_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    ckdir = Path(checkpoints) if checkpoints else out.with_name(out.name + ".ckpt")
    dev = pick_device(device)
    prep = _training_molecules(data, max_molecules, max_len, batch_size, seed, progress)
    # held-out validation slice from the training data (the MOSES test set stays untouched)
    perm = np.random.default_rng(seed + 1).permutation(len(prep.smiles))
    n_val = min(val_size, len(prep.smiles) // 10)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    resuming = resume and (ckdir / "state.json").is_file()
    start = _init_bundle(init) if init is not None and not resuming else None  # (config, weights), read once
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": None, "history": []}
    if resuming:
        state = json.loads((ckdir / "state.json").read_text())
        cfg = VAEConfig(**state["model"])
    elif start is not None:
        cfg = VAEConfig(**start[0]["model"])
    else:
        vocab = list(SPECIALS) + sorted({t for ts in prep.tokens for t in ts})
        cfg = VAEConfig(vocab=vocab, embed=embed, enc_hidden=enc_hidden, dec_hidden=dec_hidden,
                        dec_layers=dec_layers, latent=latent, max_len=max_len)
    torch.manual_seed(seed)
    model = MoleculeVAE(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 2)
    if start is not None:
        model.load_state_dict(start[1])
        if progress:
            print(f"initialised from {init}", flush=True)
    if resuming:
        model.load_state_dict(load_file(str(ckdir / "model.safetensors")))
        _load_optim_state(opt, model, load_file(str(ckdir / "optimizer.safetensors")))
        g.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if progress:
            print(f"resumed from {ckdir} at epoch {state['epoch']} batch {state['batch']} "
                  f"(step {state['step']})", flush=True)
    data_desc = (f"MOSES training set (molsets 0.3.1), {len(prep.smiles)} molecules"
                 if data is None or str(data) == "moses" else f"{data}: {len(prep.smiles)} molecules")
    run = _Run(model, opt, g, cfg, state, prep, Batches(prep, cfg.vocab, val_idx, min(500, len(val_idx))),
               out=out, ckdir=ckdir, dev=dev, progress=progress, data=data, data_desc=data_desc,
               hp={"seed": seed, "lr": lr, "batch_size": batch_size, "free_bits": free_bits, "beta": beta,
                   "cond_drop": cond_drop, **({"init": str(init)} if init is not None else {})})
    deadline = time.time() + 60 * max_minutes if max_minutes else None
    model.train()
    start_epoch = state["epoch"]
    for epoch in range(start_epoch, epochs):
        order = train_idx[np.random.default_rng(seed + 100 + epoch).permutation(len(train_idx))]
        first = state["batch"] if epoch == start_epoch else 0
        if run.epoch(epoch, epochs, order, first, workers=workers, checkpoint_every=checkpoint_every,
                     deadline=deadline):
            break
        state["epoch"], state["batch"] = epoch + 1, 0
    run.checkpoint(final=True)
    return out


def _init_bundle(init: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, weights)`` of a molecule-vae bundle to start from; one-line error if it is not one."""
    path = Path(init)
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    try:
        config = json.loads(cfg_path.read_text())
        VAEConfig(**config["model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError("--init", "a molecule-vae bundle folder (config.json with 'model', model.safetensors)",
                         got=str(init)) from None
    if not weights.is_file():
        raise InputError("--init", "a molecule-vae bundle folder with model.safetensors", got=str(init))
    return config, load_file(str(weights))


def _training_molecules(data: str | Path | None, max_molecules: int | None, max_len: int, batch_size: int,
                        seed: int, progress: bool) -> Prepared:
    """The training SMILES (a seeded subset of ``max_molecules``), checked and tokenised."""
    raw = load_training_smiles(data)
    rs = np.random.default_rng(seed)
    if max_molecules is not None and max_molecules < len(raw):
        raw = [raw[i] for i in np.sort(rs.choice(len(raw), int(max_molecules), replace=False))]
    prep = prepare(raw, max_len, progress)
    n_skipped = sum(prep.skipped.values())
    if progress:
        print(f"training molecules: {len(prep.smiles)} kept, skipped {prep.skipped}", flush=True)
    if len(prep.smiles) < 2 * batch_size:
        raise InputError("data", f"at least {2 * batch_size} valid SMILES (batch_size={batch_size})",
                         got=f"{len(prep.smiles)} valid ({n_skipped} skipped)")
    return prep


class _Run:
    """One training run: the model, its optimiser and RNG, the progress ``state`` (what a
    checkpoint stores), validation and checkpoints."""

    def __init__(self, model: MoleculeVAE, opt: torch.optim.Optimizer, g: torch.Generator, cfg: VAEConfig,
                 state: dict[str, Any], prep: Prepared, val: Batches, *, out: Path, ckdir: Path, dev: Any,
                 progress: bool, data: str | Path | None, data_desc: str, hp: dict[str, Any]) -> None:
        self.model, self.opt, self.g, self.cfg, self.state = model, opt, g, cfg, state
        self.prep, self.val, self.out, self.ckdir, self.dev = prep, val, out, ckdir, dev
        self.progress, self.data, self.data_desc, self.hp = progress, data, data_desc, hp
        self.last_stats: dict[str, float] = {}

    def epoch(self, epoch: int, epochs: int, order: np.ndarray, first: int, *, workers: int,
              checkpoint_every: int, deadline: float | None) -> bool:
        """Train on batches ``first ..`` of one epoch (checkpointing every ``checkpoint_every``
        steps); True when the ``deadline`` stopped it."""
        model, state, hp = self.model, self.state, self.hp
        ds = Batches(self.prep, self.cfg.vocab, order, hp["batch_size"])
        sub = torch.utils.data.Subset(ds, range(first, len(ds)))
        loader = torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ds), initial=first, desc=f"epoch {epoch + 1}/{epochs}", mininterval=10,
                       dynamic_ncols=True)
        stop = False
        for i, (ids, lengths, props) in enumerate(loader, start=first):
            cond = _cond_from_props(props, hp["cond_drop"], self.g).to(self.dev)
            loss, s = _loss(model, ids.to(self.dev), lengths, cond, hp["free_bits"], hp["beta"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            self.opt.step()
            self.last_stats = {k: 0.98 * self.last_stats.get(k, x) + 0.02 * x for k, x in s.items()}
            state["step"] += 1
            state["batch"] = i + 1
            state["epoch"] = epoch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rec=f"{self.last_stats['rec']:.2f}", kl=f"{self.last_stats['kl']:.2f}", refresh=False)
            if state["step"] % checkpoint_every == 0:
                self.checkpoint()
            if deadline is not None and time.time() > deadline:
                stop = True
                break
        if bar is not None:
            bar.close()
        return stop

    def validate(self) -> dict[str, float]:
        """Mean loss, reconstruction and KL over the validation batches (fixed condition masks)."""
        model, val = self.model, self.val
        model.eval()
        vg = torch.Generator().manual_seed(12345)
        tot = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        with torch.no_grad():
            for i in range(len(val)):
                ids, lengths, props = val[i]
                cond = _cond_from_props(props, self.hp["cond_drop"], vg)
                _, s = _loss(model, ids.to(self.dev), lengths, cond.to(self.dev), self.hp["free_bits"],
                             self.hp["beta"])
                for k in tot:
                    tot[k] += s[k] / len(val)
        model.train()
        return tot

    def checkpoint(self, final: bool = False) -> None:
        """Validate, write the checkpoint (atomically), and the bundle when validation improved."""
        state, ckdir, hp = self.state, self.ckdir, self.hp
        v = self.validate()
        state["history"].append({"step": state["step"], "epoch": state["epoch"],
                                 **{f"val_{k}": round(x, 4) for k, x in v.items()},
                                 **{f"train_{k}": round(x, 4) for k, x in self.last_stats.items()}})
        improved = state["best_val"] is None or v["loss"] < state["best_val"]
        ckdir.mkdir(parents=True, exist_ok=True)
        tmpm = ckdir / ".model.safetensors.tmp"
        save_file({k: t.detach().cpu().contiguous() for k, t in self.model.state_dict().items()}, str(tmpm))
        tmpo = ckdir / ".optimizer.safetensors.tmp"
        save_file(_optim_state_tensors(self.opt, self.model), str(tmpo))
        state.update(model=asdict(self.cfg), rng=_rng_state(self.g), torch_rng=torch.get_rng_state().tolist(),
                     seed=hp["seed"], skipped=self.prep.skipped, free_bits=hp["free_bits"], beta=hp["beta"],
                     lr=hp["lr"], batch_size=hp["batch_size"], cond_drop=hp["cond_drop"])
        os.replace(tmpm, ckdir / "model.safetensors")
        os.replace(tmpo, ckdir / "optimizer.safetensors")
        tmps = ckdir / ".state.json.tmp"
        tmps.write_text(json.dumps(state))
        if improved:
            state["best_val"] = v["loss"]
            self._write_bundle(v)
            tmps.write_text(json.dumps(state))
        os.replace(tmps, ckdir / "state.json")
        if self.progress:
            print(f"[step {state['step']}] val rec {v['rec']:.3f} kl {v['kl']:.3f}"
                  f"{' (best: bundle written to ' + str(self.out) + ')' if improved else ''}", flush=True)

    def _write_bundle(self, v: dict[str, float]) -> None:
        state, hp, prep = self.state, self.hp, self.prep
        metrics = {"val_reconstruction_nats": round(v["rec"], 4), "val_kl_nats": round(v["kl"], 4),
                   "train_kl_nats": round(self.last_stats.get("kl", float("nan")), 4),
                   "steps": state["step"], "molecules_seen": state["step"] * hp["batch_size"]}
        config = {"model": asdict(self.cfg), "representation": "SMILES (regex tokens)",
                  "conditioner": "property", "training": {
                      "seed": hp["seed"], "steps": state["step"], "epochs": state["epoch"],
                      "batch_size": hp["batch_size"], "lr": hp["lr"], "free_bits": hp["free_bits"],
                      "beta": hp["beta"], "cond_drop": hp["cond_drop"], "molecules": len(prep.smiles),
                      "skipped": prep.skipped, "skipped_total": sum(prep.skipped.values()),
                      "data": str(self.data or "moses"), **({"init": hp["init"]} if "init" in hp else {})}}
        save_bundle(self.out, self.model.state_dict(), config, make_card(metrics, self.data_desc))


def _cond_from_props(props: torch.Tensor, drop: float, g: torch.Generator) -> torch.Tensor:
    """Measured properties ``[B, 4]`` -> conditioner vectors with random properties hidden.

    A quarter of the rows hide every property (so unconditional sampling is trained as
    such); in the others each property is hidden with probability ``drop``; NaN ones always.
    """
    from hygeia.plugins import get_registry

    z = get_registry().get("conditioner", "property").factory.normalise(props)
    mask = (torch.rand(z.shape, generator=g) >= drop).float()
    mask *= (torch.rand(z.shape[0], 1, generator=g) >= 0.25).float()
    mask *= torch.isfinite(z).float()  # properties RDKit could not compute (NaN) are always hidden
    return torch.cat([torch.nan_to_num(z) * mask, mask], 1)


def _loss(model: MoleculeVAE, ids: torch.Tensor, lengths: torch.Tensor, cond: torch.Tensor,
          free_bits: float, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    mu, logvar = model.encode(ids, lengths, cond)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    logits = model.decode_logits(ids, z, cond)
    target = ids[:, 1:]
    rec = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=0,
                          reduction="sum") / ids.shape[0]
    kl_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)  # [latent], nats
    kl = kl_dim.sum()
    loss = rec + beta * torch.clamp(kl_dim, min=free_bits).sum()
    return loss, {"loss": float(loss.detach()), "rec": float(rec.detach()), "kl": float(kl.detach())}


def _optim_state_tensors(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                out[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).detach().cpu().clone()
    return out


def _load_optim_state(opt: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        name, k = key.split("::")
        opt.state[params[name]][k] = v.to(params[name].device) if k != "step" else v


def _rng_state(g: torch.Generator) -> list[int]:
    return g.get_state().tolist()
