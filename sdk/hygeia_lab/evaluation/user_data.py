"""Evaluate a diagnoser on labelled image files: the user's studies or an exported phantom set.

``hygeia evaluate diagnoser NAME --bundle B --data valid.csv`` reads the label file
(:func:`hygeia.data.labels.read_labels`), streams the images through the diagnoser in batches,
and reports per-finding and macro AUROC with bootstrap 95 % intervals (resampling images), the
sensitivity and specificity at the diagnoser's thresholds, and ROC curves as PNG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hygeia.api import regions_options
from hygeia.errors import InputError

BOOTSTRAP = 1000


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic (ties count half; equals sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rankdata(p)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc(y: np.ndarray, p: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """AUROC per column of ``y`` / ``p`` (NaN labels ignored) and the macro AUROC, each with a
    percentile bootstrap 95 % interval over images (resamples lacking a class are skipped)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    per: list[dict[str, float]] = []
    boots = np.full((n, y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j])
        point = _auroc(y[m, j], p[m, j])
        for b in range(n):
            ii = idx[b][m[idx[b]]]
            boots[b, j] = _auroc(y[ii, j], p[ii, j])
        lo, hi = (np.nanpercentile(boots[:, j], [2.5, 97.5]) if np.isfinite(boots[:, j]).any() else (np.nan, np.nan))
        per.append({"auroc": point, "ci95": [float(lo), float(hi)], "n": int(m.sum()), "n_pos": int(y[m, j].sum())})
    macro_boot = np.nanmean(boots, axis=1) if np.isfinite(boots).any() else np.full(n, np.nan)
    points = [r["auroc"] for r in per]
    macro = float(np.nanmean(points)) if np.isfinite(points).any() else float("nan")
    lo, hi = np.nanpercentile(macro_boot, [2.5, 97.5]) if np.isfinite(macro_boot).any() else (np.nan, np.nan)
    return {"per_finding": per, "macro_auroc": macro, "macro_ci95": [float(lo), float(hi)], "bootstrap": n}


def predict(diagnoser: Any, items: Sequence[Any], batch_size: int = 32, workers: int = 0,
            progress: bool = True, regions: list[dict[str, Any]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, F]`` of the diagnoser's findings and its thresholds, images streamed from disk.

    ``regions``: a list to fill with, per image, ``{"scale": (sx, sy), "centres": {finding: (x, y)}}``
    (the centre of each region the diagnoser drew, in its input's pixels; ``scale`` maps the
    image's own pixels to them)."""
    from hygeia_lab.training.data import ShardedPermutation, check_batch, dataset, loader

    size = int(max(diagnoser.input_size))
    reads_text = "text" in set(getattr(diagnoser, "condition_kinds", ()) or ())
    # heat maps only where regions are scored, and then at the least cost
    no_maps = {"heatmaps": False} if False in getattr(diagnoser, "heatmap_modes", ()) else {}
    kw = regions_options(diagnoser) if regions is not None else no_maps
    dl = loader(dataset(items, size), batch_size, ShardedPermutation(len(items), 0, shuffle=False), workers)
    probs: list[np.ndarray] = []
    thresholds = np.full(len(diagnoser.findings), np.nan)
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("diagnosing", total=len(items))
        for batch in dl:
            check_batch(batch)
            texts = list(batch["text"]) if reads_text and any(batch["text"]) else None
            out = diagnoser.diagnose(batch["image"].numpy(), texts=texts, **kw) if texts else \
                diagnoser.diagnose(batch["image"].numpy(), **kw)
            for d, shape in zip(out, batch["shape"].numpy()):
                by = {f.label: f for f in d.findings}
                probs.append(np.array([by[f].probability if f in by else np.nan for f in diagnoser.findings]))
                thresholds = np.array([by[f].threshold if f in by else t for f, t in zip(diagnoser.findings, thresholds)])
                if regions is not None:
                    h, w = d.image_size
                    regions.append({"scale": (w / max(int(shape[1]), 1), h / max(int(shape[0]), 1)),
                                    "centres": {f.label: f.region.center() for f in d.findings if f.region is not None}})
            bar.advance(task, len(batch["image"]))
    return np.stack(probs), thresholds


def box_hit_rates(items: Sequence[Any], regions: Sequence[dict[str, Any]], match: dict[str, str],
                  tolerance: float = 2.0) -> dict[str, dict[str, Any]]:
    """Per finding with boxes: the share of boxes (true findings) whose finding the diagnoser called
    with a region centred inside the box (scaled to its input, ``tolerance`` pixels of slack)."""
    hits: dict[str, list[bool]] = {}
    for it, reg in zip(items, regions):
        sx, sy = reg["scale"]
        for b in getattr(it, "boxes", ()):
            if b.finding not in match:
                continue
            c = reg["centres"].get(match[b.finding])
            ok = c is not None and (b.x * sx - tolerance <= c[0] <= (b.x + b.w) * sx + tolerance) \
                and (b.y * sy - tolerance <= c[1] <= (b.y + b.h) * sy + tolerance)
            hits.setdefault(b.finding, []).append(bool(ok))
    return {f: {"boxes": len(v), "hit_rate": float(np.mean(v))} for f, v in hits.items()}


def match_findings(diagnoser: Any, findings: Sequence[str], codes: Sequence[Any] | None = None) -> dict[str, str]:
    """The label file's findings the diagnoser reports: file name -> the diagnoser's name.

    By name, or by SNOMED CT code where both sides have codes (so the file's ``Pleural Effusion``
    is the phantom model's ``effusion``)."""
    own = list(diagnoser.findings)
    own_codes = {(c.value, c.scheme): f for f, c in (getattr(diagnoser, "codes", None) or {}).items()}
    out: dict[str, str] = {}
    for j, f in enumerate(findings):
        if f in own:
            out[f] = f
        elif codes is not None and (codes[j].value, codes[j].scheme) in own_codes:
            out[f] = own_codes[(codes[j].value, codes[j].scheme)]
    return out


def evaluate_items(diagnoser: Any, items: Sequence[Any], findings: Sequence[str], batch_size: int = 32,
                   progress: bool = True, seed: int = 0, codes: Sequence[Any] | None = None) -> dict[str, Any]:
    """Metrics of ``diagnoser`` on ``items`` for the label file's ``findings`` it reports
    (matched by name, or by code with ``codes``, one per finding: see :func:`match_findings`)."""
    own = list(diagnoser.findings)
    match = match_findings(diagnoser, findings, codes)
    missing = [f for f in findings if f not in match]
    if not match:
        raise InputError("--data findings", f"findings the diagnoser reports ({', '.join(own)})",
                         got=", ".join(findings))
    regions: list[dict[str, Any]] | None = [] if any(getattr(it, "boxes", ()) for it in items) else None
    p, thr = predict(diagnoser, items, batch_size=batch_size, progress=progress, regions=regions)
    cols = [f for f in findings if f in match]
    y = np.stack([it.labels for it in items])[:, [list(findings).index(f) for f in cols]]
    pp = p[:, [own.index(match[f]) for f in cols]]
    res = bootstrap_auroc(y, pp, seed=seed)
    per = {}
    for j, f in enumerate(cols):
        m = ~np.isnan(y[:, j])
        t = float(thr[own.index(match[f])])
        call, truth = pp[m, j] >= t, y[m, j] > 0.5
        per[f] = {**res["per_finding"][j], "threshold": t,
                  "sensitivity": float(call[truth].mean()) if truth.any() else float("nan"),
                  "specificity": float((~call[~truth]).mean()) if (~truth).any() else float("nan")}
    return {"diagnoser": diagnoser.identity.name, "weights_sha256": diagnoser.identity.weights_sha256,
            "n_images": len(items), "per_finding": per, "macro_auroc": res["macro_auroc"],
            "macro_ci95": res["macro_ci95"], "bootstrap": res["bootstrap"], "not_reported": missing,
            "localisation": box_hit_rates(items, regions, match) if regions is not None else {},
            "_roc": {"y": y, "p": pp, "findings": cols}}


def _evaluation_split(path: Path) -> str:
    """A datalist's list to evaluate on: ``test``, else ``validation``, else ``training``."""
    if path.suffix.lower() != ".json":
        return "training"
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "training"  # read_labels says what is wrong with the file
    lists = {k for k, v in meta.items() if isinstance(v, list) and v} if isinstance(meta, dict) else set()
    return next((k for k in ("test", "validation") if k in lists), "training")


def main_files(name: str, data: Path, bundle: Path | None = None, image_root: Path | None = None,
               codes: Path | None = None, uncertain: str | None = None, json_out: bool = False,
               roc: Path | None = None, batch_size: int = 32, boxes: Path | None = None,
               text_column: str | None = None) -> dict[str, Any]:
    """``hygeia evaluate diagnoser NAME --data LABELS [--bundle B]``: read, diagnose, print, ROC PNG
    (a datalist is evaluated on its ``test`` list, else ``validation``, else ``training``).
    ``text_column``: each image's clinical text goes to a diagnoser that reads text."""
    import contextlib
    import sys

    from hygeia.data.labels import read_labels
    from hygeia.plugins import get_registry

    diag = get_registry().create_from_bundle("diagnoser", name, bundle)
    with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
        table = read_labels(data, image_root, uncertain=uncertain or "ignore", codes=codes, progress=True,
                            split=_evaluation_split(Path(data)), boxes=boxes, text_column=text_column)
        result = evaluate_items(diag, table.rows, table.findings, batch_size=batch_size, progress=True,
                                codes=table.codes())
    result["data"] = str(data)
    if roc is not None:
        roc_png(roc, result)
    print_result(result, json_out)
    return result


def roc_png(path: Path, result: dict[str, Any]) -> Path:
    """ROC curves, one per finding, with AUROC and interval in the legend (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from hygeia.outputs import atomic_path

    roc = result["_roc"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for j, f in enumerate(roc["findings"]):
        m = ~np.isnan(roc["y"][:, j])
        if 0 < roc["y"][m, j].sum() < m.sum():
            fpr, tpr, _ = roc_curve(roc["y"][m, j], roc["p"][m, j])
            r = result["per_finding"][f]
            ax.plot(fpr, tpr, label=f"{f} {r['auroc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{result['diagnoser']}: macro AUROC {result['macro_auroc']:.3f}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def print_result(result: dict[str, Any], json_out: bool) -> None:
    """The result as JSON on stdout, or a table."""
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if json_out:
        print(json.dumps(public, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("finding", "n+", "AUROC", "95 % CI", "sens", "spec", "threshold",
              title=f"{result['diagnoser']} on {result['n_images']} images")
    for f, r in result["per_finding"].items():
        t.add_row(f, str(r["n_pos"]), f"{r['auroc']:.3f}", f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}",
                  f"{r['sensitivity']:.3f}", f"{r['specificity']:.3f}", f"{r['threshold']:.3f}")
    t.add_row("macro", "", f"{result['macro_auroc']:.3f}",
              f"{result['macro_ci95'][0]:.3f}-{result['macro_ci95'][1]:.3f}", "", "", "")
    Console().print(t)
    if result.get("localisation"):
        loc = Table("finding", "boxes", "hit rate", title="regions inside the boxes (called, centre within 2 px)")
        for f, r in result["localisation"].items():
            loc.add_row(f, str(r["boxes"]), f"{r['hit_rate']:.3f}")
        Console().print(loc)
