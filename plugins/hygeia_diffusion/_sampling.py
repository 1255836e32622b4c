"""What the ``diffusion`` plugin and its frozen runner share, without torch: sampling options and
their checks, the ``generate`` call around a sampler, and the samplers' update rules in numpy.

:class:`Sampling` holds ``generate``: it checks the call, resolves the condition (free text to
the closest label) and the guidance baseline, and records the provenance; the subclass draws the
images (``_sample``): :class:`~hygeia_diffusion.plugin.DiffusionGenerator` with torch and the
diffusers schedulers, :class:`~hygeia_diffusion._frozen.FrozenDiffusion` with ONNX graphs and
:func:`schedule`, numpy's copy of the two diffusers schedulers the plugin samples with.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from hygeia.api import GeneratedImage
from hygeia.errors import InputError
from hygeia.text import MIN_LABEL_SIMILARITY, label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CHEST_FOV_MM as FOV_MM
from hygeia.vocab import CONDITION_LABELS

NAME, VERSION = "diffusion", "1.0.0"
SIZE = 64
"""Image side in pixels."""
NULL_CLASS = len(CONDITION_LABELS)
"""Class index of 'no condition': unconditional samples and the guidance baseline."""
PIXEL_SPACING = (FOV_MM / SIZE, FOV_MM / SIZE)
MAX_N = 1024
"""Most images per ``generate`` call (the whole batch's noise and results are held in memory)."""
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
DEFAULT_GUIDANCE = 5.0
"""Guidance scale recorded as the bundle's sampling default (``hygeia evaluate generator``, shipped
weights, plain guidance: 2 -> 0.678, 3.5 -> 0.814, 5 -> 0.841 conditional accuracy; with the negative
condition ``normal``: 3 -> 0.856, 4 -> 0.890, 5 -> 0.916; see docs/plugins/diffusion.md)."""
SAMPLERS = ("ddim", "dpm")
NO_NEGATIVE = "none"
"""``negative_condition`` value for plain classifier-free guidance (the null class as baseline)."""
DEFAULT_NEGATIVE = "normal"
"""Negative condition recorded as the sampling default of new bundles: each finding is guided away
from a *normal* image instead of from the unconditional one (see :func:`hygeia_diffusion.model.denoise`)."""


def negative_class(negative: Any, labels: tuple[str, ...], cls: int) -> int:
    """The guidance baseline class of condition ``cls`` for the ``negative_condition`` option.

    ``negative``: a label of ``labels`` or ``"none"``/``""`` (the null class: plain classifier-free
    guidance); InputError otherwise. A condition is never guided away from itself (``normal`` with
    the negative ``normal`` uses the null class).
    """
    if negative in ("", NO_NEGATIVE):
        return NULL_CLASS
    if not isinstance(negative, str) or negative not in labels:
        raise InputError("negative_condition", f"one of {', '.join(labels)} or '{NO_NEGATIVE}'", got=repr(negative))
    base = labels.index(negative)
    return NULL_CLASS if base == cls else base


def sampling_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A bundle config's sampling defaults (steps, guidance scale, sampler, negative condition)."""
    d = config.get("sampling", {})
    return {"steps": int(d.get("steps", 50)), "guidance_scale": float(d.get("guidance_scale", 2.0)),
            "sampler": str(d.get("sampler", "ddim")), "negative_condition": str(d.get("negative_condition", NO_NEGATIVE))}


class Sampling:
    """``generate`` of the ``diffusion`` model; subclasses set the attributes below and ``_sample``."""

    output = "image"
    condition_kinds = frozenset({"none", "label", "text"})
    max_n = MAX_N
    min_text_similarity = MIN_LABEL_SIMILARITY
    """A free-text condition whose best cosine similarity to every label's phrases is below this is rejected."""
    labels: tuple[str, ...]
    defaults: dict[str, Any]
    identity: Any
    config: dict[str, Any]
    text_vectors: Any = None
    """The sentence encoder free text is matched with (None: :func:`hygeia.text.sentence_vectors`)."""

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], Any] | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, sampler: str | None = None, batch_size: int = 64,
                 negative_condition: str | None = None, **options: Any) -> list[GeneratedImage]:
        """``n`` images for ``condition`` (a finding label, or None), reproducible from ``seed``.

        ``steps`` in [1, 1000] (999 with ``dpm``; default from the bundle: 25); ``guidance_scale`` in [0, 20]
        (1: no guidance, 0: unconditional); ``sampler`` ``ddim`` or ``dpm``;
        ``negative_condition``: the label guidance steers away from, or ``"none"`` for the
        unconditional baseline (default from the bundle: ``normal``, so a finding is contrasted
        with a normal image; ``normal`` itself always uses the unconditional baseline);
        ``progress(done, total)`` is called after every denoising step of every batch
        (``None``/``False``: none).
        """
        n = check_n(n, max_n=self.max_n)
        seed = check_seed(seed)
        if options:
            raise InputError("generate options", "steps, guidance_scale, sampler, batch_size, negative_condition, progress",
                             got=", ".join(sorted(options)))
        kind, label, text_match = label_condition(condition, self.condition_kinds, self.labels, NAME,
                                                  self.min_text_similarity, self.text_vectors)
        steps, gs, sampler = self._sampling_options(steps, guidance_scale, sampler, batch_size)
        cls = NULL_CLASS if label is None else self.labels.index(label)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        base = negative_class(negative, self.labels, cls)
        if gs == 0:  # guidance 0 = the unconditional model
            cls, gs = NULL_CLASS, 1.0
        guided = gs != 1.0 and cls != NULL_CLASS
        pixels = self._sample(n, seed, cls, base, steps, gs, sampler, batch_size, progress)
        prov = {"generator": NAME, "version": VERSION, "weights_sha256": self.identity.weights_sha256,
                "condition_kind": kind, "sampler": sampler, "steps": steps, "guidance_scale": float(gs),
                "negative_condition": self.labels[base] if guided and base != NULL_CLASS else None,
                "mode": self.config["mode"], **text_match}
        return [GeneratedImage(np.ascontiguousarray(pixels[i]), PIXEL_SPACING, "DX", seed, label, self.identity,
                               {**prov, "index": i}) for i in range(n)]

    def _sample(self, n: int, seed: int, cls: int, base: int, steps: int, gs: float, sampler: str,
                batch_size: int, progress: Callable[[int, int], Any] | None) -> np.ndarray:
        raise NotImplementedError

    def _sampling_options(self, steps: Any, guidance_scale: Any, sampler: Any,
                          batch_size: Any) -> tuple[int, float, str]:
        """``(steps, guidance scale, sampler)`` with the bundle's defaults filled in; InputError for a
        value out of range (``batch_size`` too)."""
        steps = self.defaults["steps"] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise InputError("steps", f"an integer in [1, {MAX_STEPS}]", got=repr(steps))
        gs = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                  MAX_GUIDANCE)
        sampler = self.defaults["sampler"] if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise InputError("sampler", f"one of {', '.join(SAMPLERS)}", got=repr(sampler))
        if sampler == "dpm" and steps >= MAX_STEPS:  # DPM-Solver spaces steps + 1 points: 1001 would repeat
            raise InputError("steps", f"an integer in [1, {MAX_STEPS - 1}] with the dpm sampler", got=repr(steps))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", got=repr(batch_size))
        return int(steps), gs, sampler

    def label_for_text(self, text: str) -> tuple[str, float]:
        """The label a free-text condition asks for, and its cosine similarity
        (:func:`hygeia.text.label_for_text`: the closest label's phrases; rejected below
        :attr:`min_text_similarity`; negation is not understood)."""
        from hygeia.text import label_for_text

        return label_for_text(text, self.labels, NAME, self.min_text_similarity, self.text_vectors)


# --------------------------------------------------------------------------- samplers in numpy
def schedule(sampler: str, config: dict[str, Any], alphas_cumprod: np.ndarray, steps: int
             ) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """``(timesteps, rules)`` of a sampler as diffusers sets it up from the training ``config``:
    ``ddim`` is ``DDIMScheduler`` (eta 0), ``dpm`` is ``DPMSolverMultistepScheduler`` (DPM-Solver++
    2M, midpoint, first order at the start and the end). Step ``i`` predicts
    ``x0 = (x - s eps) / a`` and sets ``x = c x + d clip(x0) + f x0 + e (x0 - x0_prev)`` with
    ``(a, s, c, d, f, e)`` = ``rules[i]`` (``clip``: DDIM's ``clip_sample``; ``e`` is 0 for
    first-order steps). ValueError for a setting this copy does not follow (the plugin is served)."""
    for key, want in (("prediction_type", "epsilon"), ("thresholding", False), ("rescale_betas_zero_snr", False),
                      ("final_sigmas_type", "zero"), ("euler_at_final", False), ("use_karras_sigmas", False)):
        if config.get(key, want) != want:
            raise ValueError(f"scheduler {key}={config.get(key)!r} is not supported by the frozen sampler")
    ac = np.asarray(alphas_cumprod, np.float32)
    total, offset = int(config.get("num_train_timesteps", 1000)), int(config.get("steps_offset", 0))
    spacing = config.get("timestep_spacing", "leading" if sampler == "ddim" else "linspace")  # each class's default
    if sampler == "ddim":
        return _ddim(ac, total, offset, spacing, steps)
    return _dpm(ac, total, offset, spacing, steps)


def _timesteps(total: int, offset: int, spacing: str, steps: int, points: int) -> np.ndarray:
    """The first ``steps`` of ``points`` timesteps (DDIM: ``steps``, DPM-Solver: ``steps + 1``), as diffusers spaces them."""
    if spacing == "linspace":
        return np.linspace(0, total - 1, points).round()[::-1][:steps].copy().astype(np.int64)
    if spacing == "leading":
        ratio = total // points
        return (np.arange(0, points) * ratio).round()[::-1][:steps].copy().astype(np.int64) + offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported by the frozen sampler")


def _ddim(ac: np.ndarray, total: int, offset: int, spacing: str, steps: int
          ) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    ts = _timesteps(total, offset, spacing, steps, steps)
    rules = []
    for t in ts:
        prev = int(t) - total // steps
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else np.float32(1.0))  # set_alpha_to_one
        a, s = a_t ** 0.5, (1 - a_t) ** 0.5
        rules.append((float(a), float(s), float((1 - a_prev) ** 0.5 / s), float(a_prev ** 0.5),
                      float(-((1 - a_prev) ** 0.5) * a / s), 0.0))
    return ts, rules


def _dpm(ac: np.ndarray, total: int, offset: int, spacing: str, steps: int
         ) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    ts = _timesteps(total, offset, spacing, steps, steps + 1)
    if len(np.unique(ts)) != len(ts):
        raise ValueError(f"{steps} DPM-Solver steps repeat timesteps")
    sig_all = ((1 - ac) / ac) ** 0.5
    sigmas = np.concatenate([np.interp(ts, np.arange(len(sig_all)), sig_all), [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)
    sig = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    rules = []
    for i in range(len(ts)):
        h = lam[i + 1] - lam[i]
        d = -alpha[i + 1] * np.expm1(-h)
        e = 0.0 if i in (0, len(ts) - 1) else 0.5 * d * h / (lam[i] - lam[i - 1])
        rules.append((float(alpha[i]), float(sig[i]), float(sig[i + 1] / sig[i]), float(d), 0.0, float(e)))
    return ts, rules


def step(x: np.ndarray, eps: np.ndarray, rule: tuple[float, ...], x0_prev: np.ndarray | None,
         clip: float | None) -> tuple[np.ndarray, np.ndarray]:
    """One update of :func:`schedule`: ``(new x, x0)`` (float32)."""
    a, s, c, d, f, e = (np.float32(v) for v in rule)
    x0 = (x - s * eps) / a
    new = c * x + d * (x0 if clip is None else np.clip(x0, -clip, clip)) + f * x0
    if e and x0_prev is not None:
        new = new + e * (x0 - x0_prev)
    return new.astype(np.float32), x0
