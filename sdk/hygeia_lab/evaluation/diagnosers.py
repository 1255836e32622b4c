"""Held-out evaluation of any diagnoser on phantoms: AUROC, sensitivity/specificity, ECE, localisation.

``evaluate(diagnoser, phantom_set)`` works for every :class:`hygeia.api.Diagnoser` (local or
remote): images are resized to the diagnoser's ``input_size`` when they differ, the phantoms'
clinical texts are passed along, and findings the diagnoser does not report are skipped.
``hygeia evaluate diagnoser NAME`` runs :func:`hygeia_lab.evaluation.run.main`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hygeia.errors import InputError
from hygeia.outputs import atomic_path
from hygeia.vocab import FINDING_LABELS


__all__ = ["evaluate", "expected_calibration_error", "hit_rate_interval"]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width probability bins."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return F.interpolate(t, size=tuple(size), mode="area").numpy()


def evaluate(diagnoser: Any, phantom_set: Any, batch_size: int = 256, progress: bool = False,
             localisation: bool = True) -> dict[str, Any]:
    """Per-finding AUROC (sklearn), macro AUROC, sensitivity/specificity at the diagnoser's thresholds,
    ECE, and (where heat maps or regions come back) the pointing-game localisation rate: the share of
    true-positive calls whose heat-map maximum (or, without a heat map, region centre) lies in the
    true mask.
    """
    images = np.asarray(phantom_set.images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise InputError("phantom_set.images", "a non-empty float32 array [N, 1, H, W]", got=images.shape)
    size = tuple(getattr(diagnoser, "input_size", images.shape[-2:]))
    x = _resize(images, size)
    labels = np.asarray(phantom_set.labels, np.float32)
    masks = getattr(phantom_set, "masks", None)
    texts = list(phantom_set.texts) if getattr(phantom_set, "texts", None) is not None else None
    reported = tuple(getattr(diagnoser, "findings", FINDING_LABELS))
    n = len(x)
    probs = np.full((n, len(FINDING_LABELS)), np.nan)
    thresholds = np.full(len(FINDING_LABELS), np.nan)
    hits = np.zeros(len(FINDING_LABELS))
    near = np.zeros(len(FINDING_LABELS))  # within NEAR_PX pixels of the mask
    tps = np.zeros(len(FINDING_LABELS))

    def run(i: int) -> None:
        sl = slice(i, min(n, i + batch_size))
        # anchors are needed for present calls only (the region, else the heat map's peak: maps kept)
        present = localisation and "present" in getattr(diagnoser, "heatmap_modes", ())
        kw: dict[str, Any] = {"heatmaps": "present"} if present else {}
        if not localisation and "heatmaps" in _params(diagnoser.diagnose):
            kw["heatmaps"] = False
        res = diagnoser.diagnose(x[sl], texts=texts[sl] if texts is not None else None, **kw)
        for j, d in enumerate(res):
            b = sl.start + j
            for f in d.findings:
                if f.label not in FINDING_LABELS:
                    continue
                k = FINDING_LABELS.index(f.label)
                probs[b, k] = f.probability
                thresholds[k] = f.threshold
                if localisation and masks is not None and f.present and labels[b, k] > 0:
                    pt = _point(f, size, masks.shape[-2:])
                    if pt is not None:
                        tps[k] += 1
                        r, c = pt
                        hits[k] += bool(masks[b, k, r, c])
                        near[k] += _near(masks[b, k], r, c, NEAR_PX * masks.shape[-1] / NEAR_SCALE)

    starts = list(range(0, n, batch_size))
    if progress:
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task(f"evaluating {getattr(getattr(diagnoser, 'identity', None), 'name', '')}", total=n)
            for i in starts:
                run(i)
                bar.update(task, completed=min(n, i + batch_size))
    else:
        for i in starts:
            run(i)

    per, aurocs = _per_finding(labels, probs, thresholds, reported, (tps, hits, near))
    ident = getattr(diagnoser, "identity", None)
    return {
        "model": None if ident is None else {"name": ident.name, "version": ident.version,
                                             "weights_sha256": ident.weights_sha256},
        "n": n,
        "split": getattr(phantom_set, "split", ""),
        "difficulty": getattr(phantom_set, "difficulty", None),
        "mimics": getattr(phantom_set, "mimics", None),
        "per_finding": per,
        "macro_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
        **_summary(per),
        "probabilities": probs,
        "labels": labels,
    }


def _per_finding(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, reported: tuple[str, ...],
                 counts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """:func:`evaluate`'s rows per finding (AUROC, sensitivity and specificity at the threshold, ECE,
    localisation from ``counts`` = (true-positive calls with a point, hits, hits within NEAR_PX)),
    and the AUROCs that make the macro average."""
    from sklearn.metrics import roc_auc_score

    tps, hits, near = counts
    n = len(labels)
    per: dict[str, dict[str, Any]] = {}
    aurocs = []
    for k, label in enumerate(FINDING_LABELS):
        if label not in reported or np.isnan(probs[:, k]).all():
            continue
        y, p = labels[:, k], probs[:, k]
        pos = int(y.sum())
        row: dict[str, Any] = {"n_pos": pos, "n_neg": int(n - pos), "threshold": float(thresholds[k])}
        if 0 < pos < n:
            row["auroc"] = float(roc_auc_score(y, p))
            aurocs.append(row["auroc"])
            call = p >= thresholds[k]
            row["sensitivity"] = float(call[y > 0].mean())
            row["specificity"] = float((~call)[y == 0].mean())
        row["ece"] = expected_calibration_error(y, p)
        if tps[k]:
            row["localisation"] = float(hits[k] / tps[k])
            row["localisation_n"] = int(tps[k])
            row[f"localisation_within_{NEAR_PX}px"] = float(near[k] / tps[k])
            row[f"localisation_within_{NEAR_PX}px_ci95"] = hit_rate_interval(int(near[k]), int(tps[k]))
        per[label] = row
    return per, aurocs


def hit_rate_interval(hits: int, n: int) -> list[float]:
    """Wilson score 95 % interval of a hit rate of ``hits`` out of ``n`` calls (scipy's ``binomtest``):
    with a few hundred calls a localisation figure is only known to about +-0.05."""
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


NEAR_PX = 2
"""Tolerance of the lenient localisation figure: the anchor point within this many pixels of the
mask at :data:`NEAR_SCALE` px, scaled with the mask (4 px on 256 px masks)."""
NEAR_SCALE = 128


def _near(mask: np.ndarray, r: int, c: int, px: float) -> bool:
    """Whether a mask pixel lies within ``px`` pixels (Euclidean) of (r, c)."""
    w = int(np.ceil(px))
    r0, c0 = max(0, r - w), max(0, c - w)
    win = mask[r0:r + w + 1, c0:c + w + 1]
    rr, cc = np.nonzero(win)
    return bool(len(rr)) and bool((np.hypot(rr + r0 - r, cc + c0 - c) <= px).any())


def _summary(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers over findings: AUROC per finding, macro ECE, pooled localisation hit rate."""
    eces = [r["ece"] for r in per.values() if "ece" in r]
    n_loc = sum(r.get("localisation_n", 0) for r in per.values())
    near = sum(r.get(f"localisation_within_{NEAR_PX}px", 0.0) * r.get("localisation_n", 0) for r in per.values())
    hits = sum(r.get("localisation", 0.0) * r.get("localisation_n", 0) for r in per.values())
    return {
        "per_finding_auroc": {k: r["auroc"] for k, r in per.items() if "auroc" in r},
        "sensitivity": {k: r["sensitivity"] for k, r in per.items() if "sensitivity" in r},
        "specificity": {k: r["specificity"] for k, r in per.items() if "specificity" in r},
        "thresholds": {k: r["threshold"] for k, r in per.items()},
        "ece": float(np.mean(eces)) if eces else float("nan"),
        "localisation_hit_rate": float(hits / n_loc) if n_loc else None,
        "localisation_n": int(n_loc),
        f"localisation_hit_rate_within_{NEAR_PX}px": float(near / n_loc) if n_loc else None,
    }


def _params(fn: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _point(f: Any, size: tuple[int, int], mask_shape: tuple[int, int]) -> tuple[int, int] | None:
    """(row, col) in mask pixels of a finding's heat-map maximum, else its region centre."""
    sy, sx = mask_shape[0] / size[0], mask_shape[1] / size[1]
    if f.heatmap is not None:
        r, c = np.unravel_index(int(np.argmax(f.heatmap)), f.heatmap.shape)
        cx, cy = c + 0.5, r + 0.5
    elif f.region is not None:
        cx, cy = f.region.center()
    else:
        return None
    return (int(np.clip(cy * sy, 0, mask_shape[0] - 1)), int(np.clip(cx * sx, 0, mask_shape[1] - 1)))


def _roc_png(path: Path, result: dict[str, Any]) -> Path:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, label in enumerate(FINDING_LABELS):
        row = result["per_finding"].get(label)
        if not row or "auroc" not in row:
            continue
        fpr, tpr, _ = roc_curve(result["labels"][:, k], result["probabilities"][:, k])
        ax.plot(fpr, tpr, label=f"{label} ({row['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    name = (result.get("model") or {}).get("name", "")
    ax.set_title(f"{name} on {result['n']} held-out phantoms (synthetic)")
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
