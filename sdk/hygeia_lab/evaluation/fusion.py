"""Evaluating a text-aware diagnoser against its baselines and controls, on one phantom set.

``hygeia evaluate diagnoser fusion`` ends here (:func:`compare`, then :func:`report`). Rows:

- ``NAME``: with the phantoms' clinical texts;
- ``NAME_no_text``: the same model with empty text (its image-only mode);
- ``NAME_shuffled_text``: each image with another patient's text (the control: text that carries
  nothing about this image);
- ``image_only``: the image-only diagnoser that reads this size (``--baseline``; by default the
  default diagnoser, :func:`~hygeia_lab.evaluation.judges.default_baseline`);
- one row per baseline the diagnoser ships (``diagnoser.baselines()``: for ``fusion``,
  ``text_only`` and ``late_fusion``).

``comparison`` gives the paired bootstrap (resampling images, 1000 times) of the macro AUROC
difference between ``NAME`` and each other row, with its 95 % interval; ``best_image_only`` is the
better of ``image_only`` and ``NAME_no_text``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.outputs import atomic_path
from hygeia.vocab import FINDING_LABELS

from .diagnosers import NEAR_PX, evaluate
from .judges import TARGETS, default_baseline

BOOTSTRAP = 1000


def _shuffled(texts: list[str]) -> list[str]:
    """Every text moved to another image (a rotation by half the set: never its own)."""
    n = len(texts)
    return [texts[(i + n // 2) % n] for i in range(n)] if n > 1 else list(texts)


def compare(name: str, diagnoser: Any, phantom_set: Any, baseline: str | None = "",
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Each row above as what :func:`~hygeia_lab.evaluation.diagnosers.evaluate` returns."""
    from hygeia.plugins import get_registry

    out: dict[str, dict[str, Any]] = {name: evaluate(diagnoser, phantom_set, progress=progress)}
    out[f"{name}_no_text"] = evaluate(diagnoser, replace(phantom_set, texts=None), progress=progress)
    if phantom_set.texts is not None and len(phantom_set) > 1:
        out[f"{name}_shuffled_text"] = evaluate(diagnoser, replace(phantom_set, texts=_shuffled(list(phantom_set.texts))),
                                                progress=progress, localisation=False)
    if baseline == "":
        baseline = default_baseline(int(phantom_set.images.shape[-1]), exclude=name)
    if baseline and baseline != name:
        try:
            base = get_registry().create("diagnoser", baseline)
        except Exception as exc:  # noqa: BLE001 - the comparison is optional; say why it is missing
            import warnings

            warnings.warn(f"image-only baseline {baseline!r} unavailable: {exc}", stacklevel=2)
        else:
            out["image_only"] = evaluate(base, replace(phantom_set, texts=None), progress=progress)
    for kind, diag in (getattr(diagnoser, "baselines", dict)() or {}).items():
        out[kind] = evaluate(diag, phantom_set, progress=progress, localisation=False)
    return out


def _macro(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> float:
    from .user_data import _auroc

    vals = [_auroc(y[idx, k], p[idx, k]) for k in range(y.shape[1]) if not np.isnan(p[:, k]).all()]
    return float(np.nanmean(vals))


def paired_difference(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n: int = BOOTSTRAP,
                      seed: int = 0) -> dict[str, Any]:
    """Macro AUROC of ``a`` minus ``b`` on the same images, with a paired percentile bootstrap 95 %
    interval (the same resampled images score both)."""
    rng = np.random.default_rng(seed)
    everyone = np.arange(len(y))
    point = _macro(y, p_a, everyone) - _macro(y, p_b, everyone)
    boots = np.array([_macro(y, p_a, ii) - _macro(y, p_b, ii) for ii in rng.integers(0, len(y), size=(n, len(y)))])
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"difference": float(point), "ci95": [float(lo), float(hi)], "excludes_0": bool(lo > 0 or hi < 0),
            "bootstrap": n}


def comparisons(name: str, results: dict[str, dict[str, Any]], bootstrap: int = BOOTSTRAP) -> dict[str, Any]:
    """``name`` against every other row (paired bootstrap), and which image-only row is the best."""
    y = results[name]["labels"]
    image_rows = [k for k in ("image_only", f"{name}_no_text") if k in results]
    best = max(image_rows, key=lambda k: results[k]["macro_auroc"])
    out: dict[str, Any] = {"best_image_only": best}
    for k, r in results.items():
        if k != name:
            out[f"{name} - {k}"] = paired_difference(y, results[name]["probabilities"], r["probabilities"], bootstrap)
    return out


def _public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k not in ("probabilities", "labels")}


def report(name: str, ps: Any, results: dict[str, dict[str, Any]], json_out: bool, roc: Path | None,
           console: Any) -> dict[str, Any]:
    """Print the table (or JSON) of :func:`compare`'s rows and the comparisons; write ROC curves."""
    public = {k: _public(v) for k, v in results.items()}
    public["comparison"] = comparisons(name, results)
    if json_out:
        print(json.dumps(public, indent=2))
    else:
        _table(name, ps, results, public["comparison"], console)
    if roc is not None:
        _roc_compare_png(Path(roc), results)
        console.print(f"wrote ROC curves to {roc}")
    return public


def _num(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _table(name: str, ps: Any, results: dict[str, dict[str, Any]], comp: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    cols = list(results)
    t = Table("metric", *cols, title=f"{name}: {len(ps)} held-out phantoms (test split, {ps.images.shape[-1]} px, "
                                     f"{ps.look})")
    t.add_row("macro AUROC", *[_num(results[c]["macro_auroc"]) for c in cols])
    for label in FINDING_LABELS:
        t.add_row(f"  AUROC {label}", *[_num(results[c]["per_finding_auroc"].get(label)) for c in cols])
    t.add_row("ECE (mean over findings)", *[_num(results[c]["ece"]) for c in cols])
    t.add_row("localisation hit rate", *[_num(results[c]["localisation_hit_rate"]) for c in cols])
    t.add_row(f"  within {NEAR_PX} px of the finding (at 128 px)",
              *[_num(results[c].get(f"localisation_hit_rate_within_{NEAR_PX}px")) for c in cols])
    console.print(t)
    for key, d in comp.items():
        if isinstance(d, dict):
            console.print(f"{key}: {d['difference']:+.3f} macro AUROC, 95 % CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    best = comp["best_image_only"]
    gain = comp[f"{name} - {best}"]
    console.print(f"target gain over the best image-only ({best}) >= {TARGETS['gain_over_image_only']} with a CI "
                  f"excluding 0: {gain['difference']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]")
    shuffled = f"{name} - {name}_shuffled_text"
    if shuffled in comp:
        drop = results[f"{name}_shuffled_text"]["macro_auroc"] - results[best]["macro_auroc"]
        console.print(f"control: shuffled text vs best image-only {drop:+.3f} "
                      f"(target within {TARGETS['shuffled_text_within']})")
    console.print(localisation_target(results[name]))


def localisation_target(result: dict[str, Any]) -> str:
    """The localisation target line: each finding's hit rate within ``NEAR_PX`` px (at 128 px) with
    its Wilson 95 % interval and number of calls, and whether every finding meets the target."""
    key, target = f"localisation_within_{NEAR_PX}px", TARGETS["localisation_each_finding"]
    head = f"target localisation within {NEAR_PX} px (at 128 px) >= {target} for every finding:"
    rows = {f: r for f, r in result.get("per_finding", {}).items() if r.get("localisation_n")}
    if not rows:
        return f"{head} no calls to score"
    parts = [f"{f} {r[key]:.3f} [{r[key + '_ci95'][0]:.3f}, {r[key + '_ci95'][1]:.3f}] ({r['localisation_n']} calls)"
             for f, r in rows.items()]
    short = [f for f, r in rows.items() if r[key] < target]
    verdict = "met" if not short else "not met: " + ", ".join(short)
    return f"{head} {verdict}; " + "; ".join(parts)


def _roc_compare_png(path: Path, results: dict[str, dict[str, Any]]) -> Path:
    """One ROC panel per finding (plus the macro legend), one curve per compared model."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    styles = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1))]
    for k, label in enumerate(FINDING_LABELS):
        ax = axes.flat[k]
        for (model, res), ls in zip(results.items(), styles):
            auc = res["per_finding_auroc"].get(label)
            if auc is None:
                continue
            fpr, tpr, _ = roc_curve(res["labels"][:, k], res["probabilities"][:, k])
            ax.plot(fpr, tpr, linestyle=ls, label=f"{model} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.6)
        ax.set_title(label)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right", fontsize=8)
    ax = axes.flat[5]
    ax.axis("off")
    n = next(iter(results.values()))["n"]
    lines = [f"{m}: macro AUROC {r['macro_auroc']:.3f}, ECE {r['ece']:.3f}" for m, r in results.items()]
    ax.text(0.0, 0.9, f"{n} held-out phantoms (synthetic, test split)\n\n" + "\n".join(lines), va="top", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
