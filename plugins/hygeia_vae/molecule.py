"""``molecule-vae``: a conditional SMILES VAE trained on MOSES.

Representation: SMILES, tokenised into atoms and bonds with the regular expression of
Schwaller et al. (``Cl``, ``Br``, ``[nH]`` are single tokens). SELFIES would make every sample
valid by construction, but with equal training its samples matched the MOSES distribution
worse (higher FCD); a SMILES decoder learns validity quickly, and the distribution is what the
metrics reward. Invalid samples are kept in the output and flagged ``valid=False``.

Model: a bidirectional GRU encoder -> ``q(z | x, c)``, a GRU decoder ``p(x | z, c)`` whose
initial state and every input step see ``[z, c]``; ``c`` is the ``property`` conditioner's
vector (standardised logP, QED, SA, MW plus presence flags). During training each property is
hidden at random (flag 0), so the same model samples unconditionally, with some targets, or
with all four.

KL: free bits (Kingma et al. 2016): the KL of each latent dimension, averaged over the batch,
costs at least ``free_bits`` nats, so the optimiser gains nothing by pushing it lower and the
latent never collapses to KL = 0 (a plain KL ramp did). The end-of-training KL is recorded in
the model card.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hygeia import tensors
from hygeia.api import GeneratedMolecule, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import BundleError, InputError
from hygeia.validation import check_condition, check_n, check_seed

NAME, VERSION = "molecule-vae", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / NAME
PROPS = ("logP", "QED", "SA", "MW")
COND_DIM = 2 * len(PROPS)
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_TOKEN_RE = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])"
)


def tokenize(smiles: str) -> list[str] | None:
    """SMILES -> tokens, or None when the regex does not cover the whole string."""
    tokens = _TOKEN_RE.findall(smiles)
    return tokens if "".join(tokens) == smiles else None


# --------------------------------------------------------------------------- network
@dataclass
class VAEConfig:
    """Everything needed to rebuild the network (stored in config.json)."""

    vocab: list[str] = field(default_factory=list)
    embed: int = 64
    enc_hidden: int = 128
    dec_hidden: int = 256
    dec_layers: int = 1
    latent: int = 64
    cond_dim: int = COND_DIM
    max_len: int = 100  # tokens, without <bos>/<eos>


class MoleculeVAE(nn.Module):
    """Bi-GRU encoder, GRU decoder conditioned on ``[z, c]`` at its start and at every step."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v = len(cfg.vocab)
        self.embed = nn.Embedding(v, cfg.embed, padding_idx=0)
        self.encoder = nn.GRU(cfg.embed, cfg.enc_hidden, batch_first=True, bidirectional=True)
        self.to_stats = nn.Linear(2 * cfg.enc_hidden + cfg.cond_dim, 2 * cfg.latent)
        self.to_h0 = nn.Linear(cfg.latent + cfg.cond_dim, cfg.dec_layers * cfg.dec_hidden)
        self.to_step = nn.Linear(cfg.latent + cfg.cond_dim, cfg.embed)
        self.decoder = nn.GRU(cfg.embed, cfg.dec_hidden, num_layers=cfg.dec_layers, batch_first=True)
        self.out = nn.Linear(cfg.dec_hidden, v)

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, cond: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [B, T]`` (with <bos>/<eos>) -> ``mu, logvar [B, latent]``."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.encoder(packed)  # [2, B, H]
        mu, logvar = self.to_stats(torch.cat([h[0], h[1], cond], 1)).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)

    def _h0(self, zc: torch.Tensor) -> torch.Tensor:
        b = zc.shape[0]
        return torch.tanh(self.to_h0(zc)).view(b, self.cfg.dec_layers, self.cfg.dec_hidden).transpose(0, 1).contiguous()

    def decode_logits(self, tokens: torch.Tensor, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits for ``tokens[:, 1:]`` given ``tokens[:, :-1]``."""
        zc = torch.cat([z, cond], 1)
        x = self.embed(tokens[:, :-1]) + self.to_step(zc)[:, None]
        y, _ = self.decoder(x, self._h0(zc))
        return self.out(y)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
               temperature: float = 1.0) -> torch.Tensor:
        """Autoregressive sampling -> token ids ``[B, <= max_len + 1]`` (EOS, then PAD).

        Finished rows leave the batch, so the cost follows the mean length, not the longest.
        Random draws come from ``generator`` (CPU) in a fixed order: reproducible from its seed.
        """
        b = z.shape[0]
        zc = torch.cat([z, cond], 1)
        step = self.to_step(zc)[:, None]
        h = self._h0(zc)
        never = [self.cfg.vocab.index(t) for t in (PAD, BOS, UNK)]
        eos = self.cfg.vocab.index(EOS)
        out = torch.zeros(b, self.cfg.max_len + 1, dtype=torch.long)
        active = torch.arange(b)
        tok = torch.full((b, 1), self.cfg.vocab.index(BOS), dtype=torch.long, device=z.device)
        t = 0
        for t in range(self.cfg.max_len + 1):
            y, h = self.decoder(self.embed(tok) + step, h)
            logits = self.out(y[:, 0]).float().cpu() / temperature
            logits[:, never] = -1e9
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            out[active, t] = nxt
            keep = nxt != eos
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                idx = keep.nonzero()[:, 0]
                active, nxt, step = active[idx], nxt[idx], step[idx.to(z.device)]
                h = h[:, idx.to(z.device)].contiguous()
            tok = nxt[:, None].to(z.device)
        return out[:, :t + 1]


# --------------------------------------------------------------------------- generator
class MoleculeVAEGenerator:
    """``generate(n, condition=None | {"logP": 2.5, ...}, seed=0) -> list[GeneratedMolecule]``."""

    output = "molecule"
    condition_kinds = frozenset({"none", "properties"})
    max_n = 100_000

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        path = Path(bundle) if bundle else WEIGHTS
        b = load_bundle(path, device="cpu")
        try:
            self.cfg = VAEConfig(**b.config["model"])
        except (KeyError, TypeError) as exc:
            raise BundleError(f"model bundle {path}: config.json lacks a valid 'model' section: {exc}") from exc
        self.device = pick_device(device)
        self.model = MoleculeVAE(self.cfg)
        self.model.load_state_dict(b.tensors)
        self.model.to(self.device).eval()
        self.identity = ModelIdentity(NAME, VERSION, "generator", b.sha256)
        self.card = b.card
        self.config = b.config
        from hygeia.plugins import get_registry

        self.conditioner = get_registry().create("conditioner", "property", device=str(self.device))

    def _conditions(self, n: int, condition: Any) -> torch.Tensor:
        kind = check_condition(condition, self.condition_kinds, NAME)
        if kind == "none":
            return torch.zeros(n, COND_DIM, device=self.device)
        return self.conditioner.encode([condition]).to(self.device).expand(n, -1)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> SMILES strings (stopping at EOS)."""
        vocab, eos = self.cfg.vocab, self.cfg.vocab.index(EOS)
        out = []
        for row in ids.tolist():
            chars = []
            for i in row:
                if i == eos or i == 0:
                    break
                chars.append(vocab[i])
            out.append("".join(chars))
        return out

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, batch_size: int = 2048,
                 temperature: float | None = None, properties: bool = False,
                 **options: Any) -> list[GeneratedMolecule]:
        """Sample ``n`` molecules from the prior; the same ``seed`` gives the same molecules.

        ``temperature``: softmax temperature (default: the bundle's ``sampling.temperature``,
        chosen on held-out training molecules); ``properties=True`` also fills each valid
        molecule's logP/QED/SA/MW (slower).
        """
        if temperature is None:
            temperature = float(self.config.get("sampling", {}).get("temperature", 1.0))
        if options:
            raise InputError("options", "batch_size, temperature or properties", got=", ".join(options))
        n, seed = check_n(n, self.max_n), check_seed(seed)
        if not (isinstance(temperature, (int, float)) and 0.05 <= temperature <= 5):
            raise InputError("temperature", "a number in [0.05, 5]", got=repr(temperature))
        cond = self._conditions(n, condition)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.latent, generator=g).to(self.device)
        smiles: list[str] = []
        for start in range(0, n, batch_size):
            ids = self.model.sample(z[start:start + batch_size], cond[start:start + batch_size], g, temperature)
            smiles.extend(self.decode(ids))
            if progress is not None:
                progress(len(smiles), n)
        from rdkit import Chem

        from hygeia_lab.evaluation.molecules import molecular_properties, quiet_rdkit

        quiet_rdkit()
        out = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s) if s else None
            props = molecular_properties(mol) if (properties and mol is not None) else {}
            out.append(GeneratedMolecule(s, mol is not None, seed, condition, self.identity, props))
        return out


# --------------------------------------------------------------------------- data
def load_training_smiles(data: str | Path | None) -> list[str]:
    """The MOSES training SMILES (default), or a .smi/.csv file of your own."""
    if data is None or str(data) == "moses":
        from hygeia_lab.evaluation._moses_compat import import_moses

        return list(import_moses().get_dataset("train"))
    path = Path(data)
    if not path.is_file():
        raise InputError("data", "'moses' or an existing .smi/.csv file of SMILES", got=str(data))
    if path.suffix.lower() == ".csv" or path.name.endswith(".csv.gz"):
        import pandas as pd

        df = pd.read_csv(path)
        col = next((c for c in df.columns if c.lower() == "smiles"), None)
        if col is None:
            raise InputError(str(path), "a CSV with a SMILES column", got=", ".join(df.columns))
        return [str(s) for s in df[col]]
    from hygeia_lab.evaluation.molecules import read_smiles

    return read_smiles(path)


@dataclass
class Prepared:
    smiles: list[str]
    tokens: list[list[str]]
    skipped: dict[str, int]


def prepare(smiles: Sequence[str], max_len: int, progress: bool = True) -> Prepared:
    """Keep SMILES RDKit parses and the tokenizer covers within ``max_len``; count the rest."""
    from rdkit import Chem

    from hygeia_lab.evaluation.molecules import quiet_rdkit

    quiet_rdkit()
    keep, toks = [], []
    skipped = {"invalid_smiles": 0, "untokenizable": 0, "too_long": 0}
    for s in _track(smiles, "checking SMILES", progress):
        s = s.strip()
        if not s or Chem.MolFromSmiles(s) is None:
            skipped["invalid_smiles"] += 1
            continue
        t = tokenize(s)
        if t is None:
            skipped["untokenizable"] += 1
        elif len(t) > max_len:
            skipped["too_long"] += 1
        else:
            keep.append(s)
            toks.append(t)
    return Prepared(keep, toks, skipped)


def _track(it: Sequence[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return it
    from rich.progress import track

    return track(it, description=desc, transient=True)


class _Batches(torch.utils.data.Dataset):
    """Batch i of an epoch: token ids, lengths and measured properties (computed lazily)."""

    def __init__(self, prep: Prepared, vocab: list[str], order: np.ndarray, batch_size: int) -> None:
        self.prep, self.index = prep, {t: i for i, t in enumerate(vocab)}
        self.order, self.batch_size = order, batch_size
        self.props: dict[int, list[float]] = {}

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from rdkit import Chem

        from hygeia_lab.evaluation.molecules import molecular_properties

        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        seqs = [[self.index[BOS]] + [self.index.get(t, self.index[UNK]) for t in self.prep.tokens[j]]
                + [self.index[EOS]] for j in idx]
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = torch.tensor(s)
        props = []
        for j in idx:
            j = int(j)
            if j not in self.props:
                p = molecular_properties(Chem.MolFromSmiles(self.prep.smiles[j]))
                self.props[j] = [p[k] for k in PROPS]
            props.append(self.props[j])
        return ids, lengths, torch.tensor(props, dtype=torch.float32)


# --------------------------------------------------------------------------- training
def _cond_from_props(props: torch.Tensor, drop: float, g: torch.Generator) -> torch.Tensor:
    """Measured properties ``[B, 4]`` -> conditioner vectors with random properties hidden.

    A quarter of the rows hide every property (so unconditional sampling is trained as
    such); in the others each property is hidden with probability ``drop``.
    """
    from hygeia.plugins import get_registry

    z = get_registry().get("conditioner", "property").factory.normalise(props)
    mask = (torch.rand(z.shape, generator=g) >= drop).float()
    mask *= (torch.rand(z.shape[0], 1, generator=g) >= 0.25).float()
    return torch.cat([z * mask, mask], 1)


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


def _card(metrics: dict[str, Any], data_desc: str) -> ModelCard:
    return ModelCard(
        intended_use="Research and demonstration: sample drug-like molecules (SMILES), optionally "
                     "steered toward logP/QED/SA/MW targets. Not for clinical or safety decisions.",
        training_data=data_desc,
        metrics=metrics,
        limitations="Trained briefly on CPU; samples follow MOSES (250-350 Da, no charges, no stereo). "
                    "Some samples are invalid SMILES (flagged valid=False). Property conditioning "
                    "shifts distributions, it does not guarantee the target.",
    )


def _rng_state(g: torch.Generator) -> list[int]:
    return g.get_state().tolist()


def train(out: str | Path = WEIGHTS, seed: int = 0, progress: bool = True, epochs: int = 1,
          resume: bool = False, data: str | Path | None = None, max_molecules: int | None = None,
          batch_size: int = 128, lr: float = 1e-3, free_bits: float = 0.1, beta: float = 1.0,
          cond_drop: float = 0.3, max_minutes: float | None = None, checkpoint_every: int = 500,
          val_size: int = 2000, device: str | None = None, workers: int = 1,
          checkpoints: str | Path | None = None, embed: int = 64, enc_hidden: int = 128,
          dec_hidden: int = 256, dec_layers: int = 1, latent: int = 64, max_len: int = 100,
          threads: int | None = None) -> Path:
    """Train the molecule VAE and write a bundle to ``out`` (the best checkpoint by validation loss).

    Checkpoints (model, Adam state, data position, RNG state; safetensors + JSON) go to
    ``checkpoints`` (default ``OUT.ckpt/``) every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues from the last one. ``max_minutes`` stops cleanly after that much
    wall time. ``data``: 'moses' (default) or a .smi/.csv file; invalid SMILES are skipped and
    counted (``config.json`` -> ``training.skipped``).
    """
    seed = check_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    ckdir = Path(checkpoints) if checkpoints else out.with_name(out.name + ".ckpt")
    dev = pick_device(device)
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
    # held-out validation slice from the training data (the MOSES test set stays untouched)
    perm = np.random.default_rng(seed + 1).permutation(len(prep.smiles))
    n_val = min(val_size, len(prep.smiles) // 10)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": None, "history": []}
    if resume and (ckdir / "state.json").is_file():
        state = json.loads((ckdir / "state.json").read_text())
        cfg = VAEConfig(**state["model"])
    else:
        vocab = list(SPECIALS) + sorted({t for ts in prep.tokens for t in ts})
        cfg = VAEConfig(vocab=vocab, embed=embed, enc_hidden=enc_hidden, dec_hidden=dec_hidden,
                        dec_layers=dec_layers, latent=latent, max_len=max_len)
    torch.manual_seed(seed)
    model = MoleculeVAE(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 2)
    if resume and (ckdir / "state.json").is_file():
        model.load_state_dict(load_file(str(ckdir / "model.safetensors")))
        _load_optim_state(opt, model, load_file(str(ckdir / "optimizer.safetensors")))
        g.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if progress:
            print(f"resumed from {ckdir} at epoch {state['epoch']} batch {state['batch']} "
                  f"(step {state['step']})", flush=True)
    data_desc = (f"MOSES training set (molsets 0.3.1), {len(prep.smiles)} molecules"
                 if data is None or str(data) == "moses" else f"{data}: {len(prep.smiles)} molecules")
    val = _Batches(prep, cfg.vocab, val_idx, min(500, len(val_idx)))
    deadline = time.time() + 60 * max_minutes if max_minutes else None
    last_stats: dict[str, float] = {}

    def validate() -> dict[str, float]:
        model.eval()
        vg = torch.Generator().manual_seed(12345)
        tot = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        with torch.no_grad():
            for i in range(len(val)):
                ids, lengths, props = val[i]
                cond = _cond_from_props(props, cond_drop, vg)
                _, s = _loss(model, ids.to(dev), lengths, cond.to(dev), free_bits, beta)
                for k in tot:
                    tot[k] += s[k] / len(val)
        model.train()
        return tot

    def checkpoint(final: bool = False) -> None:
        nonlocal state
        v = validate()
        state["history"].append({"step": state["step"], "epoch": state["epoch"], **{f"val_{k}": round(x, 4) for k, x in v.items()},
                                 **{f"train_{k}": round(x, 4) for k, x in last_stats.items()}})
        improved = state["best_val"] is None or v["loss"] < state["best_val"]
        ckdir.mkdir(parents=True, exist_ok=True)
        tmpm = ckdir / ".model.safetensors.tmp"
        save_file({k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()}, str(tmpm))
        tmpo = ckdir / ".optimizer.safetensors.tmp"
        save_file(_optim_state_tensors(opt, model), str(tmpo))
        state.update(model=asdict(cfg), rng=_rng_state(g), torch_rng=torch.get_rng_state().tolist(),
                     seed=seed, skipped=prep.skipped, free_bits=free_bits, beta=beta, lr=lr,
                     batch_size=batch_size, cond_drop=cond_drop)
        os.replace(tmpm, ckdir / "model.safetensors")
        os.replace(tmpo, ckdir / "optimizer.safetensors")
        tmps = ckdir / ".state.json.tmp"
        tmps.write_text(json.dumps(state))
        if improved:
            state["best_val"] = v["loss"]
            metrics = {"val_reconstruction_nats": round(v["rec"], 4), "val_kl_nats": round(v["kl"], 4),
                       "train_kl_nats": round(last_stats.get("kl", float("nan")), 4),
                       "steps": state["step"], "molecules_seen": state["step"] * batch_size}
            config = {"model": asdict(cfg), "representation": "SMILES (regex tokens)",
                      "conditioner": "property", "training": {
                          "seed": seed, "steps": state["step"], "epochs": state["epoch"], "batch_size": batch_size,
                          "lr": lr, "free_bits": free_bits, "beta": beta, "cond_drop": cond_drop,
                          "molecules": len(prep.smiles), "skipped": prep.skipped,
                          "skipped_total": n_skipped, "data": str(data or "moses")}}
            save_bundle(out, model.state_dict(), config, _card(metrics, data_desc))
            tmps.write_text(json.dumps(state))
        os.replace(tmps, ckdir / "state.json")
        if progress:
            print(f"[step {state['step']}] val rec {v['rec']:.3f} kl {v['kl']:.3f}"
                  f"{' (best: bundle written to ' + str(out) + ')' if improved else ''}", flush=True)

    model.train()
    stop = False
    start_epoch = state["epoch"]
    for epoch in range(start_epoch, epochs):
        order = train_idx[np.random.default_rng(seed + 100 + epoch).permutation(len(train_idx))]
        ds = _Batches(prep, cfg.vocab, order, batch_size)
        first = state["batch"] if epoch == start_epoch else 0
        sub = torch.utils.data.Subset(ds, range(first, len(ds)))
        loader = torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ds), initial=first, desc=f"epoch {epoch + 1}/{epochs}", mininterval=10,
                       dynamic_ncols=True)
        for i, (ids, lengths, props) in enumerate(loader, start=first):
            cond = _cond_from_props(props, cond_drop, g).to(dev)
            loss, s = _loss(model, ids.to(dev), lengths, cond, free_bits, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            last_stats = {k: 0.98 * last_stats.get(k, x) + 0.02 * x for k, x in s.items()}
            state["step"] += 1
            state["batch"] = i + 1
            state["epoch"] = epoch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rec=f"{last_stats['rec']:.2f}", kl=f"{last_stats['kl']:.2f}", refresh=False)
            if state["step"] % checkpoint_every == 0:
                checkpoint()
            if deadline is not None and time.time() > deadline:
                stop = True
                break
        if bar is not None:
            bar.close()
        if stop:
            break
        state["epoch"], state["batch"] = epoch + 1, 0
    checkpoint(final=True)
    return out


def _shipped_card() -> ModelCard:
    """The model card of the shipped weights (with their measured metrics), if present."""
    try:
        return ModelCard.from_dict(json.loads((WEIGHTS / "model_card.json").read_text()))
    except (OSError, ValueError, TypeError):
        return _card({}, "MOSES training set (molsets 0.3.1)")


def update_card_metrics(bundle: str | Path, metrics: dict[str, Any] | None = None,
                        sampling: dict[str, Any] | None = None) -> None:
    """Merge measured ``metrics`` into a bundle's model card and ``sampling`` defaults
    (e.g. ``{"temperature": 0.8}``) into its config; the weights stay unchanged."""
    b = load_bundle(bundle)
    card = ModelCard.from_dict({**b.card.to_dict(), "metrics": {**dict(b.card.metrics), **(metrics or {})}})
    config = {**b.config, "sampling": {**b.config.get("sampling", {}), **(sampling or {})}}
    save_bundle(bundle, b.tensors, config, card)


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Conditional SMILES VAE (GRU, free-bits KL) trained on MOSES; logP/QED/SA/MW targets",
    factory=MoleculeVAEGenerator,
    **tensors.generator("molecule"),
    model_card=_shipped_card(),
    train=train,
)
