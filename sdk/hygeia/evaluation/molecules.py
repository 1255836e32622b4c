"""MOSES metrics for generated molecules, next to the published baselines.

``evaluate_smiles`` runs :func:`moses.get_all_metrics` (``pip install --no-deps molsets==0.3.1``
plus ``fcd_torch``) against the MOSES test set; ``render_table`` prints the result beside the
MOSES paper's baselines; ``write_molecules`` writes .smi or .sdf atomically. RDKit and MOSES
are imported lazily, so ``import hygeia`` stays light.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError

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
PROPERTY_NAMES: tuple[str, ...] = ("logP", "QED", "SA", "MW")


def baselines() -> dict[str, dict[str, float]]:
    """The MOSES baselines (CharRNN, VAE, AAE, JTN-VAE, LatentGAN) and the training set (a copy)."""
    return {k: dict(v) for k, v in _BASELINES.items()}


def quiet_rdkit() -> None:
    """Silence RDKit's per-molecule warnings (parse errors, deprecations) for bulk work."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


def _sascorer() -> Any:
    import importlib

    from rdkit.Chem import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score")
    if path not in sys.path:
        sys.path.append(path)
    return importlib.import_module("sascorer")


def molecular_properties(mol: Any) -> dict[str, float]:
    """RDKit logP (Crippen), QED, SA score (Ertl) and molecular weight of a SMILES or Mol.

    Raises InputError for a SMILES that RDKit cannot parse.
    """
    from rdkit import Chem
    from rdkit.Chem import QED, Crippen, Descriptors

    if isinstance(mol, str):
        m = Chem.MolFromSmiles(mol)
        if m is None:
            raise InputError("smiles", "a SMILES string RDKit can parse", got=repr(mol)[:100])
        mol = m
    return {"logP": float(Crippen.MolLogP(mol)), "QED": float(QED.qed(mol)),
            "SA": float(_sascorer().calculateScore(mol)), "MW": float(Descriptors.MolWt(mol))}


def read_smiles(path: str | os.PathLike[str]) -> list[str]:
    """SMILES from a .smi/.txt file (first whitespace-separated field of each non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("path", "an existing .smi file (one SMILES per line)", got=str(path))
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line.split()[0])
    if not out:
        raise InputError(str(path), "at least one SMILES line", got="an empty file")
    return out


def write_molecules(smiles: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write SMILES to ``.smi`` (one per line) or ``.sdf`` (RDKit, 2D coordinates), atomically.

    In an SDF, SMILES that RDKit cannot parse are written as empty molecules named with the
    SMILES and a ``valid`` property of 0, so line i of the input stays record i.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".smi", ".txt", ".sdf"):
        raise InputError("out", "a .smi or .sdf path", got=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".sdf":
            from rdkit import Chem
            from rdkit.Chem import AllChem

            quiet_rdkit()
            writer = Chem.SDWriter(tmp)
            for i, s in enumerate(smiles):
                mol = Chem.MolFromSmiles(s)
                valid = mol is not None
                if mol is None:
                    mol = Chem.Mol()
                else:
                    AllChem.Compute2DCoords(mol)
                mol.SetProp("_Name", f"hygeia-{i}")
                mol.SetProp("SMILES", s)
                mol.SetProp("valid", str(int(valid)))
                mol.SetProp("synthetic", "1")
                writer.write(mol)
            writer.close()
        else:
            with open(tmp, "w") as f:
                f.write("".join(s + "\n" for s in smiles))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    """``molecular_properties`` for every SMILES RDKit parses (invalid ones are left out)."""
    from rdkit import Chem

    quiet_rdkit()
    rows = []
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        if m is not None:
            rows.append(molecular_properties(m))
    return rows
