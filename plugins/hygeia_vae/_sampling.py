"""What the ``vae`` plugin and its frozen runner share, without torch: ``generate`` around the
networks, its option checks, and drawing from the label priors (numpy).

:class:`Sampling` checks the call, resolves the condition (free text to the closest label) and the
guidance, draws the prior samples (:func:`sample_prior`, or a flow prior's base noise) and
records the provenance; the subclass maps each batch of draws to images (``_images``):
:class:`~hygeia_vae.plugin.ImageVAE` with torch, :class:`~hygeia_vae._frozen.FrozenVae` with ONNX
graphs. The noise comes from :class:`hygeia.noise.TorchGenerator`: what ``torch.Generator``
seeded alike draws, so a seed gives the same images with and without torch.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from hygeia.api import GeneratedImage
from hygeia.errors import InputError
from hygeia.noise import TorchGenerator
from hygeia.text import MIN_LABEL_SIMILARITY, label_condition
from hygeia.validation import check_guidance_scale, check_n, check_seed
from hygeia.vocab import CONDITION_LABELS

from ._bundle import MAX_GUIDANCE, MAX_N, NAME, PIXEL_SPACING, VERSION, check_temperature

PRIORS: tuple[str, ...] = (*CONDITION_LABELS, "none")
"""Rows of the prior tensors and of the flow's condition embedding: one per condition label, then
the pooled (unconditional) prior."""
NO_NEGATIVE = "none"
"""The pooled prior's row name; as ``negative_condition``, guidance away from the pooled prior."""
GRID = (16, 8, 8)
"""Shape of the flow's base noise per sample: the squeezed ``[4, 16, 16]`` latent."""


def sample_prior(prior: dict[str, np.ndarray], row: int, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """``n`` flat latents ``float32 [n, D]`` from prior ``row`` (arrays as the bundle's ``prior.*``
    tensors; row ``i`` of one ``randn`` call is image ``i``'s noise): the principal-subspace
    Gaussian mixture when the prior has one (``gmm_*``), else the low-rank-plus-diagonal Gaussian.
    ``temperature`` scales the Gaussian noise (for the mixture: within the chosen component)."""
    g = TorchGenerator(seed)
    t = np.float32(temperature)
    if "gmm_weights" in prior:
        mean, basis, w, mus, chol = (np.asarray(prior[k][row], np.float32)
                                     for k in ("mean", "basis", "gmm_weights", "gmm_means", "gmm_chol"))
        k = basis.shape[1]
        # width a multiple of 16: torch's CPU normal sampler fills blocks of 16 values, so only then
        # is row i the same whatever n is (image i independent of how many are drawn with it)
        e = g.randn(n, -(-(1 + k) // 16) * 16)
        u = (0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in e[:, 0].tolist()]))).astype(np.float32)
        comp = np.searchsorted(np.cumsum(w), u).clip(max=len(w) - 1)  # the first draw, made uniform, picks it
        y = mus[comp] + t * np.einsum("nij,nj->ni", chol[comp], e[:, 1:1 + k])
        return (mean + y @ basis.T).astype(np.float32)
    mean, comps, scales, resid = (np.asarray(prior[k][row], np.float32)
                                  for k in ("mean", "components", "scales", "residual"))
    k = scales.shape[0]
    e = g.randn(n, k + mean.shape[0])  # row i: image i's noise
    return (mean + t * ((e[:, :k] * scales) @ comps.T + e[:, k:] * resid)).astype(np.float32)


class Sampling:
    """``generate`` of the ``vae`` model; subclasses set the attributes below and ``_images``."""

    output = "image"
    condition_kinds = frozenset({"none", "label", "text"})  # text: mapped to the closest label
    max_n = MAX_N
    defaults: dict[str, Any]
    identity: Any
    prior_kind: str
    prior_arrays: dict[str, np.ndarray]
    latent_shape: tuple[int, int, int]
    has_flow: bool
    text_vectors: Any = None
    """The sentence encoder free text is matched with (None: :func:`hygeia.text.sentence_vectors`)."""

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], Any] | None = None, temperature: float | None = None,
                 batch_size: int = 256, guidance_scale: float | None = None,
                 negative_condition: str | None = None, **options: Any) -> list[GeneratedImage]:
        """``n`` images for ``condition`` (a finding label, or None), reproducible from ``seed``.

        ``temperature`` in (0, 2] scales the prior's noise (lower: closer to the label's mean
        image, less diverse; default: the bundle's, else 1). ``guidance_scale`` in [0, 20] (1:
        unguided) and ``negative_condition`` (a label or ``"none"``: the pooled prior) guide the
        sample away from the negative (flow-paired when the bundle has a guiding flow, else a
        mean shift: :mod:`hygeia_vae.plugin`); default: the bundle's (shipped: 7 away from
        ``normal``, flow-paired); the null condition and a condition equal to its negative are not
        guided. ``progress(done, total)`` is called after each decoded batch.
        """
        n = check_n(n, max_n=self.max_n)
        seed = check_seed(seed)
        if options:
            raise InputError("generate options", "temperature, batch_size, guidance_scale, negative_condition, "
                             "progress", got=", ".join(sorted(options)))
        kind, label, text_match = label_condition(condition, self.condition_kinds, CONDITION_LABELS, NAME,
                                                  MIN_LABEL_SIMILARITY, self.text_vectors)
        temperature, scale, negative = self._sampling_options(temperature, batch_size, guidance_scale,
                                                              negative_condition)
        row, base = PRIORS.index(label or "none"), PRIORS.index(negative)
        if row == base or label is None or scale == 1.0:  # nothing to guide
            scale, negative = 1.0, None
        z = self._draw(n, row, base, scale, seed, float(temperature))
        out: list[np.ndarray] = []
        for start in range(0, n, batch_size):
            out.append(self._images(z[start:start + batch_size], row, base, scale))
            if callable(progress):  # progress=False/None: no callback
                progress(min(start + batch_size, n), n)
        pixels = np.concatenate(out).astype(np.float32)
        prov = {"generator": NAME, "version": VERSION, "weights_sha256": self.identity.weights_sha256,
                "condition_kind": kind, "temperature": float(temperature), "sampler": "label-conditional latent prior",
                "guidance_scale": scale, "negative_condition": negative, **text_match}
        return [GeneratedImage(np.ascontiguousarray(pixels[i]), PIXEL_SPACING, "DX", seed, label, self.identity,
                               {**prov, "index": i}) for i in range(n)]

    def _images(self, z: np.ndarray, row: int, base: int, scale: float) -> np.ndarray:
        """Images ``float32 [B, 1, 64, 64]`` in [0, 1] of a batch of draws (:meth:`_draw`)."""
        raise NotImplementedError

    def _sampling_options(self, temperature: Any, batch_size: Any, guidance_scale: Any,
                          negative_condition: Any) -> tuple[Any, float, str]:
        """Checked ``(temperature, guidance scale, negative condition)``, the bundle's defaults filled in."""
        if temperature is None:
            temperature = self.defaults["temperature"]
        check_temperature(temperature)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", got=repr(batch_size))
        scale = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                     MAX_GUIDANCE)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        if not isinstance(negative, str) or negative.strip().lower() not in (*CONDITION_LABELS, NO_NEGATIVE):
            raise InputError("negative_condition", f"a label of {', '.join(CONDITION_LABELS)} or {NO_NEGATIVE!r}",
                             got=repr(negative)[:200])
        return temperature, scale, negative.strip().lower()

    def _draw(self, n: int, row: int, base: int, scale: float, seed: int, temperature: float) -> np.ndarray:
        """The ``n`` draws: a flow prior's base noise (image i's is row i of one randn call), else
        prior samples (mean-shifted when guided without a flow), shaped as latents."""
        if self.prior_kind == "flow":
            return np.float32(temperature) * TorchGenerator(seed).randn(n, *GRID)
        z = sample_prior(self.prior_arrays, row, n, seed, temperature)
        if scale != 1.0 and not self.has_flow:  # mean-shift guidance
            m = self.prior_arrays["mean"]
            z = z + np.float32(scale - 1.0) * (m[row] - m[base])
        return z.reshape(n, *self.latent_shape)


def sampling_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A bundle config's sampling defaults (a bundle without them samples unguided)."""
    sampling = config.get("sampling", {})
    return {"guidance_scale": float(sampling.get("guidance_scale", 1.0)),
            "negative_condition": str(sampling.get("negative_condition", NO_NEGATIVE)),
            "temperature": float(sampling.get("temperature", 1.0))}
