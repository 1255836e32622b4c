"""Chemistry helpers shared by molecule generators and their evaluation (RDKit, imported lazily).

``molecular_properties`` gives logP, QED, SA and molecular weight; ``valid_smiles`` tells which
SMILES RDKit accepts (bulk, fast); ``read_smiles`` and
``write_molecules`` read and write ``.smi`` / ``.sdf`` files (written atomically); ``quiet_rdkit``
silences RDKit's per-molecule warnings for bulk work.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

PROPERTY_NAMES: tuple[str, ...] = ("logP", "QED", "SA", "MW")
"""The properties :func:`molecular_properties` returns."""


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


def valid_smiles(smiles: Sequence[str]) -> list[bool]:
    """Which ``smiles`` RDKit reads as molecules: the verdict of ``Chem.MolFromSmiles(s) is not
    None`` (MOSES's validity), about 30 % faster in bulk. Parsing is followed only by the
    sanitisation steps that can reject a molecule (valence, kekulisation, aromaticity); the steps
    that only annotate it, and hydrogen removal, are skipped. Empty strings are invalid."""
    from rdkit import Chem

    quiet_rdkit()
    params = Chem.SmilesParserParams()
    params.sanitize, params.removeHs = False, False
    flags = Chem.SANITIZE_PROPERTIES | Chem.SANITIZE_KEKULIZE | Chem.SANITIZE_SETAROMATICITY
    out = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s, params) if s else None
        out.append(mol is not None and Chem.SanitizeMol(mol, flags, catchErrors=True) == Chem.SANITIZE_NONE)
    return out


def molecular_properties(mol: Any) -> dict[str, float]:
    """RDKit logP (Crippen), QED, SA score (Ertl) and molecular weight of a SMILES or Mol.

    Raises InputError for a SMILES that RDKit cannot parse, and for the rare molecule that RDKit
    parses but cannot sanitise again (QED removes hydrogens, which re-kekulises: e.g.
    ``O=C(c1cc(N2CCCC2=O)c2ccoc2c2O)s1C1CC1O2``).
    """
    from rdkit import Chem
    from rdkit.Chem import QED, Crippen, Descriptors

    if isinstance(mol, str):
        m = Chem.MolFromSmiles(mol)
        if m is None:
            raise InputError("smiles", "a SMILES string RDKit can parse", got=repr(mol)[:100])
        mol = m
    try:
        return {"logP": float(Crippen.MolLogP(mol)), "QED": float(QED.qed(mol)),
                "SA": float(_sascorer().calculateScore(mol)), "MW": float(Descriptors.MolWt(mol))}
    except (Chem.rdchem.MolSanitizeException, RuntimeError, ValueError) as exc:
        raise InputError("molecule", "one whose properties RDKit can compute",
                         got=f"{Chem.MolToSmiles(mol)[:100]} ({type(exc).__name__})") from None


def read_smiles(path: str | os.PathLike[str]) -> list[str]:
    """SMILES from a .smi/.txt file (first whitespace-separated field of each non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("path", "an existing .smi file (one SMILES per line)", got=str(path))
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(str(path), "a UTF-8 text file of SMILES (one per line)",
                         got=f"byte {exc.object[exc.start]:#04x} at offset {exc.start}") from None
    for line in text.splitlines():
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
