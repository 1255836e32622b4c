"""``hygeia evaluate diagnoser NAME`` on held-out phantoms: :func:`main`.

An image-only diagnoser gets one table (:func:`hygeia_lab.evaluation.diagnosers.evaluate`); a
diagnoser that reads clinical text gets the comparison with its baselines and controls
(:mod:`hygeia_lab.evaluation.fusion`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .diagnosers import _roc_png, evaluate
from .fusion import compare, report


def main(name: str, n: int = 2000, json_out: bool = False, roc: Path | None = None, size: int | None = None,
         difficulty: float | None = None, baseline: str | None = "", bundle: Path | None = None) -> dict[str, Any]:
    """``hygeia evaluate diagnoser NAME``: ``n`` test-split phantoms, print a table or JSON.

    The phantoms are rendered at ``size`` pixels (default: the diagnoser's own input size); a
    compared baseline with another input size gets them area-resized (see :func:`evaluate`).
    """
    from rich.console import Console
    from rich.table import Table

    from hygeia_lab.phantoms import DEFAULT_DIFFICULTY, make_phantom_set
    from hygeia.plugins import get_registry
    from hygeia.validation import check_n

    n = check_n(n, name="n")

    diag = get_registry().create_from_bundle("diagnoser", name, bundle)
    if size is None:
        size = int(max(getattr(diag, "input_size", (64, 64))))
    console = Console(stderr=json_out)
    import contextlib
    import sys

    # with --json, stdout carries only the JSON: progress bars go to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    config = getattr(diag, "config", {})
    if difficulty is None:  # the difficulty the diagnoser was trained at, when its bundle says
        difficulty = float(config.get("difficulty", DEFAULT_DIFFICULTY))
    with quiet:  # and the look-alike rate it was trained at (make_phantom's ``mimics``)
        ps = make_phantom_set(n, "test", size=size, difficulty=difficulty, progress=True,
                              workers=max(1, min(4, os.cpu_count() or 1)), mimics=float(config.get("mimics", 0.0)))
        if "text" in set(getattr(diag, "condition_kinds", ()) or ()):
            results = compare(name, diag, ps, baseline=baseline)
    if "text" in set(getattr(diag, "condition_kinds", ()) or ()):
        return report(name, ps, results, json_out=json_out, roc=roc, console=console)
    with quiet:
        res = evaluate(diag, ps, progress=True)
    public = {k: v for k, v in res.items() if k not in ("probabilities", "labels")}
    if json_out:
        print(json.dumps(public, indent=2))
    else:
        t = Table("finding", "n+", "AUROC", "sens", "spec", "threshold", "ECE", "localisation",
                  title=f"{name} on {n} held-out phantoms (test split, {ps.look})")
        for label, r in res["per_finding"].items():
            f = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
            t.add_row(label, str(r["n_pos"]), f("auroc"), f("sensitivity"), f("specificity"), f("threshold"),
                      f("ece"), f("localisation"))
        t.add_row("macro", "", f"{res['macro_auroc']:.3f}", "", "", "", "", "")
        console.print(t)
    if roc is not None:
        _roc_png(Path(roc), res)
        console.print(f"wrote ROC curves to {roc}")
    return public
