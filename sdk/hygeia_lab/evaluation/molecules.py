"""MOSES metrics for generated molecules, next to the published baselines.

``evaluate_smiles`` runs :func:`moses.get_all_metrics` (``pip install --no-deps molsets==0.3.1``
plus ``fcd_torch``) against the MOSES test set; ``render_table`` prints the result beside the
MOSES paper's baselines (the .smi/.sdf readers and writers live in :mod:`hygeia.chem`). RDKit and MOSES
are imported lazily, so ``import hygeia`` stays light.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from hygeia.chem import molecular_properties, quiet_rdkit, read_smiles
from hygeia.errors import InputError

# MOSES (Polykovskiy et al. 2020; molecularsets/moses README, v0.3): mean over 3 runs of 30,000
# samples vs the test set. "Train" is the training set itself scored the same way.
_BASELINES: dict[str, dict[str, float]] = {
    "Train": {"valid": 1.0, "unique@1000": 1.0, "unique@10000": 1.0, "FCD/Test": 0.008, "FCD/TestSF": 0.4755, "SNN/Test": 0.6419, "SNN/TestSF": 0.5859, "Frag/Test": 1.0, "Frag/TestSF": 0.9986, "Scaf/Test": 0.9907, "Scaf/TestSF": 0.0, "IntDiv": 0.8567, "IntDiv2": 0.8508, "Filters": 1.0, "Novelty": 1.0},
    "CharRNN": {"valid": 0.9748, "unique@1000": 1.0, "unique@10000": 0.9994, "FCD/Test": 0.0732, "FCD/TestSF": 0.5204, "SNN/Test": 0.6015, "SNN/TestSF": 0.5649, "Frag/Test": 0.9998, "Frag/TestSF": 0.9983, "Scaf/Test": 0.9242, "Scaf/TestSF": 0.1101, "IntDiv": 0.8562, "IntDiv2": 0.8503, "Filters": 0.9943, "Novelty": 0.8419},
    "VAE": {"valid": 0.9767, "unique@1000": 1.0, "unique@10000": 0.9984, "FCD/Test": 0.099, "FCD/TestSF": 0.567, "SNN/Test": 0.6257, "SNN/TestSF": 0.5783, "Frag/Test": 0.9994, "Frag/TestSF": 0.9984, "Scaf/Test": 0.9386, "Scaf/TestSF": 0.0588, "IntDiv": 0.8558, "IntDiv2": 0.8498, "Filters": 0.997, "Novelty": 0.6949},
    "AAE": {"valid": 0.9368, "unique@1000": 1.0, "unique@10000": 0.9973, "FCD/Test": 0.5555, "FCD/TestSF": 1.0572, "SNN/Test": 0.6081, "SNN/TestSF": 0.5677, "Frag/Test": 0.991, "Frag/TestSF": 0.9905, "Scaf/Test": 0.9022, "Scaf/TestSF": 0.0789, "IntDiv": 0.8557, "IntDiv2": 0.8499, "Filters": 0.996, "Novelty": 0.7931},
    "JTN-VAE": {"valid": 1.0, "unique@1000": 1.0, "unique@10000": 0.9996, "FCD/Test": 0.3954, "FCD/TestSF": 0.9382, "SNN/Test": 0.5477, "SNN/TestSF": 0.5194, "Frag/Test": 0.9965, "Frag/TestSF": 0.9947, "Scaf/Test": 0.8964, "Scaf/TestSF": 0.1009, "IntDiv": 0.8551, "IntDiv2": 0.8493, "Filters": 0.976, "Novelty": 0.9143},
    "LatentGAN": {"valid": 0.8966, "unique@1000": 1.0, "unique@10000": 0.9968, "FCD/Test": 0.2968, "FCD/TestSF": 0.8281, "SNN/Test": 0.5371, "SNN/TestSF": 0.5132, "Frag/Test": 0.9986, "Frag/TestSF": 0.9972, "Scaf/Test": 0.8867, "Scaf/TestSF": 0.1072, "IntDiv": 0.8565, "IntDiv2": 0.8505, "Filters": 0.9735, "Novelty": 0.9498},
}
# Direction of "better" for each metric (FCD: lower; the rest: higher).
_LOWER_IS_BETTER = {"FCD/Test", "FCD/TestSF"}
METRIC_ORDER = ("valid", "unique@1000", "unique@10000", "FCD/Test", "FCD/TestSF", "SNN/Test",
                "SNN/TestSF", "Frag/Test", "Frag/TestSF", "Scaf/Test", "Scaf/TestSF", "IntDiv",
                "IntDiv2", "Filters", "Novelty", "logP", "SA", "QED", "weight")


def baselines() -> dict[str, dict[str, float]]:
    """The MOSES baselines (CharRNN, VAE, AAE, JTN-VAE, LatentGAN) and the training set (a copy)."""
    return {k: dict(v) for k, v in _BASELINES.items()}



def evaluate_smiles(smiles: Sequence[str], n_jobs: int = 1, device: str = "cpu",
                    batch_size: int = 512) -> dict[str, float]:
    """``moses.get_all_metrics`` on ``smiles`` against the MOSES test and scaffold-test sets.

    Returns the MOSES metrics (valid, unique@1000/10000, FCD/SNN/Frag/Scaf on Test and TestSF,
    IntDiv, IntDiv2, Filters, Novelty, property Wasserstein distances) plus ``n`` (samples).
    """
    smiles = list(smiles)
    if not smiles or not all(isinstance(s, str) for s in smiles):
        raise InputError("smiles", "a non-empty list of SMILES strings", got=f"{len(smiles)} items")
    from ._moses_compat import import_moses

    moses = import_moses()
    quiet_rdkit()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Can't compute unique@10000" for small n: reported as NaN
        metrics = moses.get_all_metrics(smiles, n_jobs=n_jobs, device=device, batch_size=batch_size)
    if len(smiles) < 10000:
        metrics["unique@10000"] = float("nan")
    out = {k: float(v) for k, v in metrics.items()}
    out["n"] = float(len(smiles))
    return out


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}"


def render_table(metrics: dict[str, float], title: str = "MOSES metrics") -> Any:
    """A rich Table: our metrics next to the MOSES baselines (FCD lower is better)."""
    from rich.table import Table

    base = baselines()
    t = Table(title=f"{title} (n={int(metrics.get('n', 0)) or '?'})")
    t.add_column("metric", no_wrap=True)
    t.add_column("ours", style="bold")
    for name in base:
        t.add_column(name)
    for key in METRIC_ORDER:
        if key not in metrics:
            continue
        arrow = "↓" if key in _LOWER_IS_BETTER or key in ("logP", "SA", "QED", "weight") else "↑"
        t.add_row(f"{key} {arrow}", _fmt(metrics[key]), *[_fmt(base[m].get(key)) for m in base])
    return t


def main(path: Path, json_out: bool = False, n_jobs: int = 1, device: str | None = None) -> dict[str, float]:
    """``hygeia evaluate molecules PATH``: read a .smi file, run MOSES, print the table or JSON."""
    from rich.console import Console

    smiles = read_smiles(path)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    err = Console(stderr=True)
    with err.status(f"MOSES metrics on {len(smiles)} SMILES (FCD on {device})..."):
        metrics = evaluate_smiles(smiles, n_jobs=n_jobs, device=device)
    console = Console()
    if json_out:
        console.print_json(json.dumps({"metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
                                       "baselines": baselines()}))
    else:
        console.print(render_table(metrics, title=f"MOSES metrics for {path}"))
    return metrics


def property_rows(smiles: Iterable[str]) -> list[dict[str, float]]:
    """``molecular_properties`` for every SMILES RDKit parses (invalid ones, and the rare valid one
    whose properties RDKit cannot compute, are left out)."""
    from rdkit import Chem

    quiet_rdkit()
    rows = []
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        if m is not None:
            try:
                rows.append(molecular_properties(m))
            except InputError:  # parsed, but RDKit cannot compute its properties: left out too
                continue
    return rows
