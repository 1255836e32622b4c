"""Training data of the ``molecule-vae`` trainer (split out of :mod:`hygeia_molvae.train`): the
SMILES to train on, their checks and tokens, and the batches of token ids and measured properties."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hygeia.errors import InputError

from .model import BOS, EOS, PROPS, UNK, tokenize


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
    from hygeia.chem import read_smiles

    return read_smiles(path)


@dataclass
class Prepared:
    """The SMILES kept for training, their tokens, and counts of those skipped (by reason)."""

    smiles: list[str]
    tokens: list[list[str]]
    skipped: dict[str, int]


def prepare(smiles: Sequence[str], max_len: int, progress: bool = True) -> Prepared:
    """Keep SMILES RDKit parses and the tokenizer covers within ``max_len``; count the rest."""
    from rdkit import Chem

    from hygeia.chem import quiet_rdkit

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


class Batches(torch.utils.data.Dataset):
    """Batch i of an epoch: token ids, lengths and measured properties (computed lazily)."""

    def __init__(self, prep: Prepared, vocab: list[str], order: np.ndarray, batch_size: int) -> None:
        self.prep, self.index = prep, {t: i for i, t in enumerate(vocab)}
        self.order, self.batch_size = order, batch_size
        self.props: dict[int, list[float]] = {}

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from rdkit import Chem

        from hygeia.chem import molecular_properties

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
                try:
                    p = molecular_properties(Chem.MolFromSmiles(self.prep.smiles[j]))
                    self.props[j] = [p[k] for k in PROPS]
                except InputError:  # RDKit cannot compute them: the molecule trains unconditioned
                    self.props[j] = [math.nan] * len(PROPS)
            props.append(self.props[j])
        return ids, lengths, torch.tensor(props, dtype=torch.float32)
