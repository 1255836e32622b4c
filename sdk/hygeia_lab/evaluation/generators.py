"""Evaluation of image generators against held-out phantoms, judged by an image-only diagnoser.

For each condition ('normal' and each finding of :data:`hygeia.vocab.FINDING_LABELS`) the
generator draws ``n`` images and the phantom generator draws ``n`` held-out real images (split
``test``, that finding alone). Then:

- **conditional accuracy**: the judge (the default image-only diagnoser, trained on real phantoms only)
  says whether each image shows the requested finding (for 'normal': no finding at all).
  ``real_conditional_accuracy`` is the same judge on the real images; their ratio is the figure
  that counts, since the judge itself is imperfect (design.md, "Judging generators fairly").
- **Fréchet distance** (MONAI ``FIDMetric``) and **KID** (unbiased MMD² with the cubic polynomial
  kernel, Bińkowski et al. 2018) between the judge's penultimate features of all generated and
  all real images.
- **diversity**: mean MS-SSIM (MONAI ``MultiScaleSSIMMetric``, kernel 3 at 64 px) over pairs of
  images of one condition, generated and real; a generator that collapses scores higher.

The lab finds the generator and the judge only through the plugin registry.
"""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.errors import InputError
from hygeia_lab.evaluation.judges import default_baseline
from hygeia_lab.grids import write_grid
from hygeia.vocab import CONDITION_LABELS, FINDING_LABELS, finding

REAL_SIZE = 64
"""The size of the held-out real phantoms (and of the built-in image generators' samples)."""
MAX_N = 5000  # per condition: 6 conditions x (generated + real) images and features in memory
MIN_N = 10
SAMPLING_KEYS = ("sampler", "steps", "guidance_scale", "negative_condition", "temperature", "truncation")
"""Provenance keys recorded per condition as ``per_condition[label]["sampling"]``: the settings the
generator actually used (its defaults unless the caller passed options)."""
TARGETS = {"accuracy_ratio": 0.95, "ms_ssim_gap": 0.05,
           "conditional_accuracy": {"diffusion": 0.90, "gan": 0.90, "vae": 0.80}}
TEXT_PROMPTS = {"normal": "normal chest radiograph", **{f: f"chest radiograph with {finding(f).code.meaning.lower()}"
                                                         for f in FINDING_LABELS}}
"""Prompts used for generators that take text but not labels."""


# --------------------------------------------------------------------------- metrics
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, F]`` (MONAI FIDMetric)."""
    import torch
    from monai.metrics import FIDMetric

    return float(FIDMetric()(torch.from_numpy(np.asarray(feats_a, np.float64)),
                             torch.from_numpy(np.asarray(feats_b, np.float64))))


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 50,
                              subset_size: int = 200, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over random subsets of the unbiased MMD² with kernel ``(x.y/d + 1)^3``."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise InputError("features", "at least 2 feature vectors per set for KID", got=m)
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def ms_ssim_diversity(images: np.ndarray, pairs: int | None = None, seed: int = 0) -> float:
    """Mean MS-SSIM over random pairs of distinct images ``[N, 1, H, W]`` (lower = more diverse).

    MONAI's MultiScaleSSIMMetric with a 3-pixel kernel (its default 11 needs images of >= 160 px
    for 5 scales); pairs are ``(p[i], p[i+1])`` along a seeded random permutation ``p``.
    """
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    x = np.asarray(images, np.float32)
    if x.ndim != 4 or len(x) < 2:
        raise InputError("images", "at least 2 images [N, 1, H, W]", got=f"shape {list(x.shape)}")
    perm = np.random.default_rng(seed).permutation(len(x))
    k = len(x) - 1 if pairs is None else min(pairs, len(x) - 1)
    a, b = torch.from_numpy(x[perm[:k]]), torch.from_numpy(x[perm[1:k + 1]])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=3)
    return float(metric(a, b).mean())


# --------------------------------------------------------------------------- the judge
def judge_features(judge: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The judge's penultimate features ``[N, F]``.

    Uses ``judge.features(images)`` when the diagnoser has it; otherwise the input of the last
    ``torch.nn.Linear`` of ``judge.net`` (a forward hook), which is the penultimate layer of a
    classifier ending in a linear head.
    """
    if hasattr(judge, "features"):
        return np.asarray(judge.features(images), np.float32)
    import torch

    net = getattr(judge, "net", None)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)] if isinstance(net, torch.nn.Module) else []
    if not linears:
        raise InputError(f"judge {getattr(judge.identity, 'name', judge)!r}",
                         "a diagnoser with features(images) or a torch network ending in a Linear layer")
    grabbed: list[np.ndarray] = []
    hook = linears[-1].register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].detach().float().cpu().numpy()))
    try:
        for i in range(0, len(images), batch_size):
            judge.predict_proba(images[i:i + batch_size]) if hasattr(judge, "predict_proba") else \
                judge.diagnose(images[i:i + batch_size])
    finally:
        hook.remove()
    return np.concatenate(grabbed).reshape(len(images), -1)


def judge_probabilities(judge: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, 5]`` and thresholds ``[5]`` (FINDING_LABELS order)."""
    if hasattr(judge, "predict_proba") and hasattr(judge, "thresholds"):
        return np.asarray(judge.predict_proba(images)), np.asarray(judge.thresholds, np.float64)
    ds = judge.diagnose(images)
    probs = np.array([[next(f.probability for f in d.findings if f.label == k) for k in FINDING_LABELS] for d in ds])
    thr = np.array([next(f.threshold for f in ds[0].findings if f.label == k) for k in FINDING_LABELS])
    return probs, thr


def shows_condition(probs: np.ndarray, thresholds: np.ndarray, condition: str) -> np.ndarray:
    """bool ``[N]``: the judge calls the requested finding present ('normal': nothing present)."""
    present = probs >= thresholds[None]
    if condition == "normal":
        return ~present.any(1)
    return present[:, FINDING_LABELS.index(condition)]


# --------------------------------------------------------------------------- evaluation
def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not MIN_N <= n <= MAX_N:
        raise InputError("n", f"an integer number of samples per condition in [{MIN_N}, {MAX_N}]", got=repr(n))
    return int(n)


def _conditions_for(gen: Any, kind: str | None) -> tuple[str, list[Any]]:
    kinds = set(getattr(gen, "condition_kinds", ()))
    if kind is None:
        kind = "label" if "label" in kinds else "text" if "text" in kinds else "none"
    if kind not in kinds or kind not in ("label", "text", "none"):
        raise InputError("condition kind", f"one the generator takes, of label, text, none ({sorted(kinds)})",
                         got=repr(kind))
    if kind == "label":
        return kind, list(CONDITION_LABELS)
    if kind == "text":
        return kind, [TEXT_PROMPTS[c] for c in CONDITION_LABELS]
    return kind, [None]


class _Bar:
    """A rich progress bar (on stderr) fed by generators' ``progress(done, total)`` callbacks."""

    def __init__(self, total: int, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.prog.start()
        self.task = self.prog.add_task(what, total=total)

    def callback(self, offset: int) -> Any:
        return lambda done, total: self.prog.update(self.task, completed=offset + done)

    def set(self, done: int) -> None:
        self.prog.update(self.task, completed=done)

    def close(self) -> None:
        self.prog.stop()


def real_images(n: int, progress: bool = False) -> dict[str, np.ndarray]:
    """Held-out real phantoms (split ``test``), ``n`` per condition, each finding alone
    (condition ``k`` uses test images ``k*n .. (k+1)*n - 1``: different patients per condition)."""
    from hygeia_lab.phantoms import make_phantom_set

    bar = _Bar(len(CONDITION_LABELS) * n, "held-out phantoms") if progress else None
    out: dict[str, np.ndarray] = {}
    try:
        for k, c in enumerate(CONDITION_LABELS):
            chunks = []
            for s in range(0, n, 50):
                m = min(50, n - s)
                chunks.append(make_phantom_set(m, split="test", size=REAL_SIZE,
                                               findings=[] if c == "normal" else [c], start=k * n + s).images)
                if bar is not None:
                    bar.set(k * n + s + m)
            out[c] = np.concatenate(chunks)
    finally:
        if bar is not None:
            bar.close()
    return out


def _sample_all(gen: Any, labels: list[str], conds: list[Any], n: int, seed: int, options: dict[str, Any],
                progress: bool) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], float]:
    """``n`` images per condition label (seed ``seed + 1000 (k + 1)`` for the k-th), the sampling
    settings each label's images recorded in their provenance, and the seconds it all took."""
    gen_imgs: dict[str, np.ndarray] = {}
    used: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    bar = _Bar(len(labels) * n, f"{gen.identity.name}: sampling") if progress else None
    takes_progress = "progress" in inspect.signature(gen.generate).parameters
    try:
        for k, (label, cond) in enumerate(zip(labels, conds)):
            opts: dict[str, Any] = dict(options)
            if bar is not None and takes_progress:
                opts["progress"] = bar.callback(k * n)
            out = gen.generate(n, condition=cond, seed=seed + 1000 * (k + 1), **opts)
            gen_imgs[label] = np.stack([np.asarray(r.pixels, np.float32) for r in out])
            prov = getattr(out[0], "provenance", None) or {}
            used[label] = {k: prov[k] for k in SAMPLING_KEYS if k in prov}
            if bar is not None:
                bar.set((k + 1) * n)
    finally:
        if bar is not None:
            bar.close()
    sampling_s = time.perf_counter() - t0
    return gen_imgs, used, sampling_s


def evaluate_generator(gen: Any, judge: Any, n: int = 200, condition_kind: str | None = None, seed: int = 0,
                       progress: bool = False, real: dict[str, np.ndarray] | None = None,
                       options: dict[str, Any] | None = None) -> dict[str, Any]:
    """All generator metrics as a JSON-able dict (see the module docstring).

    ``options``: keyword options for every ``gen.generate`` call (e.g. ``{"guidance_scale": 1}``);
    checked with one single-image call before any other work.
    """
    n = _check_n(n)
    if getattr(gen, "output", None) != "image":
        raise InputError("generator", "an image generator (output='image')", got=getattr(gen, "output", None))
    kind, conds = _conditions_for(gen, condition_kind)
    options = dict(options or {})
    if "progress" in options:
        raise InputError("options", "generate options other than 'progress' (the evaluation reports progress)",
                         got="'progress'")
    if options:
        gen.generate(1, condition=conds[0], seed=seed, **options)  # a bad option fails here, before any work
    real = real if real is not None else real_images(n, progress=progress)
    labels = list(CONDITION_LABELS) if kind != "none" else ["(unconditional)"]
    gen_imgs, used, sampling_s = _sample_all(gen, labels, conds, n, seed, options, progress)
    real_all = np.concatenate([real[c][:n] for c in CONDITION_LABELS])
    gen_all = np.concatenate(list(gen_imgs.values()))

    per: dict[str, dict[str, Any]] = {}
    acc = racc = None
    if kind != "none":
        hits, rhits = [], []
        for label in labels:
            p, thr = judge_probabilities(judge, gen_imgs[label])
            rp, _ = judge_probabilities(judge, real[label][:n])
            h, rh = shows_condition(p, thr, label), shows_condition(rp, thr, label)
            hits.append(h)
            rhits.append(rh)
            per[label] = {"conditional_accuracy": float(h.mean()), "real_conditional_accuracy": float(rh.mean()),
                          "sampling": used.get(label, {}),
                          "ms_ssim_generated": ms_ssim_diversity(gen_imgs[label], seed=seed),
                          "ms_ssim_real": ms_ssim_diversity(real[label][:n], seed=seed)}
        acc, racc = float(np.concatenate(hits).mean()), float(np.concatenate(rhits).mean())
        ms_gen = float(np.mean([v["ms_ssim_generated"] for v in per.values()]))
        ms_real = float(np.mean([v["ms_ssim_real"] for v in per.values()]))
    else:
        ms_gen = ms_ssim_diversity(gen_all, seed=seed)
        ms_real = float(np.mean([ms_ssim_diversity(real[c][:n], seed=seed) for c in CONDITION_LABELS]))
    fg, fr = judge_features(judge, gen_all), judge_features(judge, real_all)
    kid_mean, kid_std = kernel_inception_distance(fg, fr, seed=seed)
    return {
        "generator": gen.identity.name,
        "generator_weights_sha256": gen.identity.weights_sha256,
        "judge": judge.identity.name,
        "judge_weights_sha256": judge.identity.weights_sha256,
        "condition_kind": kind,
        "n_per_condition": n,
        "seed": seed,
        "options": options,
        "conditional_accuracy": acc,
        "real_conditional_accuracy": racc,
        "accuracy_ratio": None if acc is None or not racc else acc / racc,
        "frechet": frechet_distance(fg, fr),
        "kid": kid_mean,
        "kid_std": kid_std,
        "ms_ssim_generated": ms_gen,
        "ms_ssim_real": ms_real,
        "ms_ssim_gap": abs(ms_gen - ms_real),
        "feature_dim": int(fg.shape[1]),
        "sampling_seconds": sampling_s,
        "per_condition": per,
        "_samples": {label: imgs[:8] for label, imgs in gen_imgs.items()},
    }


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the headline metrics and the per-condition breakdown."""
    from rich.table import Table

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    t = Table(title=f"generator {result['generator']!r} judged by {result['judge']!r} "
                    f"({result['n_per_condition']} per condition, {result['condition_kind']} conditions)")
    for col in ("condition", "cond. accuracy", "real accuracy", "ratio", "MS-SSIM gen", "MS-SSIM real"):
        t.add_column(col, justify="left" if col == "condition" else "right")
    for label, v in result["per_condition"].items():
        ratio = v["conditional_accuracy"] / v["real_conditional_accuracy"] if v["real_conditional_accuracy"] else None
        t.add_row(label, f(v["conditional_accuracy"]), f(v["real_conditional_accuracy"]), f(ratio),
                  f(v["ms_ssim_generated"]), f(v["ms_ssim_real"]))
    t.add_row("[b]all[/b]", f(result["conditional_accuracy"]), f(result["real_conditional_accuracy"]),
              f(result["accuracy_ratio"]), f(result["ms_ssim_generated"]), f(result["ms_ssim_real"]))
    t.caption = (f"Fréchet distance {result['frechet']:.3f}   KID {result['kid']:.4f} ± {result['kid_std']:.4f}   "
                 f"MS-SSIM gap {result['ms_ssim_gap']:.3f}   (features: {result['judge']} penultimate, "
                 f"{result['feature_dim']}-d)")
    return t


def main(name: str, n: int = 200, json_out: bool = False, grid: Path | None = None,
         condition_kind: str | None = None, seed: int = 0, options: dict[str, Any] | None = None,
         judge_name: str | None = None) -> dict[str, Any]:
    """What ``hygeia evaluate generator NAME`` runs: print JSON or a table (and write a PNG grid).

    ``judge_name``: the image-only diagnoser that judges the samples (None: the default diagnoser
    if it reads the held-out phantoms' size, :data:`REAL_SIZE`, else the installed diagnoser that
    does; see :func:`hygeia_lab.evaluation.diagnosers.default_baseline`).
    """
    from rich.console import Console

    from hygeia.plugins import get_registry

    n = _check_n(n)
    reg = get_registry()
    spec = reg.get("generator", name)  # PluginNotFoundError names the generators there are
    gen = spec.factory()
    _conditions_for(gen, condition_kind)  # bad condition kind: fail before any work
    judge = reg.create("diagnoser", judge_name or default_baseline(REAL_SIZE))
    console = Console(stderr=json_out)
    result = evaluate_generator(gen, judge, n=n, condition_kind=condition_kind, seed=seed, progress=True,
                                options=options)
    samples = result.pop("_samples")
    if json_out:
        print(json.dumps(result, indent=2))
        if grid is not None:
            write_grid(np.concatenate(list(samples.values())), grid, ncol=8, row_labels=list(samples))
        return result
    console.print(render_table(result))
    path = write_grid(np.concatenate(list(samples.values())), grid or Path("out/evaluate") / f"generator-{name}.png",
                      ncol=8, row_labels=list(samples))
    console.print(f"samples (8 per condition): {path}")
    return result
