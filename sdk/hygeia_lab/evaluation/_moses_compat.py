"""Compatibility shims that let MOSES (``molsets==0.3.1``, 2020) run on today's stack.

The only module that patches anything for MOSES; :func:`import_moses` applies the shims once
and imports ``moses``. Three shims:

- ``rdkit.six``: RDKit removed its ``six`` copy (2020.09); MOSES' SA scorer imports
  ``from rdkit.six import iteritems``. We register a tiny module with the names it uses.
- ``pandas.DataFrame.append``: removed in pandas 2.0; MOSES' filters (``compute_filters``)
  call ``_mcf.append(_pains, sort=True)``. We add it back as a thin ``pd.concat`` wrapper.
- ``moses.metrics.metrics.cos_similarity`` (Frag, Scaf): recent SciPy keeps integer count
  vectors as int64, and ``|ref|^2 * |gen|^2`` overflows for 30k samples against the test set
  ("math domain error"). We compute the same cosine similarity in float64.
"""
from __future__ import annotations

import sys
import types
from typing import Any

_applied = False


def _install_rdkit_six() -> None:
    try:
        import rdkit.six  # noqa: F401  (old RDKit still has it)
        return
    except ImportError:
        pass
    import rdkit

    six = types.ModuleType("rdkit.six")
    six.iteritems = lambda d, **kw: iter(d.items(**kw))  # type: ignore[attr-defined]
    six.itervalues = lambda d, **kw: iter(d.values(**kw))  # type: ignore[attr-defined]
    six.iterkeys = lambda d, **kw: iter(d.keys(**kw))  # type: ignore[attr-defined]
    six.PY3 = True  # type: ignore[attr-defined]
    six.string_types = (str,)  # type: ignore[attr-defined]
    six.integer_types = (int,)  # type: ignore[attr-defined]
    six.moves = types.SimpleNamespace(range=range, zip=zip, map=map)  # type: ignore[attr-defined]
    sys.modules["rdkit.six"] = six
    rdkit.six = six  # type: ignore[attr-defined]


def _install_dataframe_append() -> None:
    import pandas as pd

    if hasattr(pd.DataFrame, "append"):
        return

    def append(self: "pd.DataFrame", other: Any, ignore_index: bool = False,
               verify_integrity: bool = False, sort: bool = False) -> "pd.DataFrame":
        """``DataFrame.append`` as pandas < 2 had it, via ``pd.concat``."""
        if isinstance(other, (pd.Series, dict)):
            other = pd.DataFrame([other])
        elif isinstance(other, list):
            other = pd.concat(other) if other and isinstance(other[0], pd.DataFrame) else pd.DataFrame(other)
        return pd.concat([self, other], ignore_index=ignore_index,
                         verify_integrity=verify_integrity, sort=sort)

    pd.DataFrame.append = append  # type: ignore[attr-defined]


def _patch_cos_similarity(moses_metrics: types.ModuleType) -> None:
    import numpy as np

    if getattr(moses_metrics.cos_similarity, "_hygeia_float64", False):
        return

    def cos_similarity(ref_counts: dict, gen_counts: dict) -> float:
        """1 - cosine distance between two count dicts, in float64 (no integer overflow)."""
        if len(ref_counts) == 0 or len(gen_counts) == 0:
            return float("nan")
        keys = np.unique(list(ref_counts.keys()) + list(gen_counts.keys()))
        ref = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
        gen = np.array([gen_counts.get(k, 0) for k in keys], dtype=np.float64)
        return float(ref @ gen / (np.linalg.norm(ref) * np.linalg.norm(gen)))

    cos_similarity._hygeia_float64 = True  # type: ignore[attr-defined]
    moses_metrics.cos_similarity = cos_similarity


def apply() -> None:
    """Install both shims (idempotent)."""
    global _applied
    if _applied:
        return
    _install_rdkit_six()
    _install_dataframe_append()
    _applied = True


def import_moses() -> types.ModuleType:
    """Apply the shims and return the ``moses`` package (``pip install --no-deps molsets==0.3.1``)."""
    apply()
    try:
        import moses
        import moses.metrics.metrics as moses_metrics
    except ImportError as exc:
        raise ImportError(
            "MOSES metrics need: pip install --no-deps molsets==0.3.1 fcd_torch==1.0.7 && "
            f"pip install rdkit pandas matplotlib ({exc})") from exc
    _patch_cos_similarity(moses_metrics)
    return moses
