"""What the ``gan`` plugin and its frozen runner share, without torch: ``generate`` around the
generator network, its option checks, condition vectors and guidance, and the seeded noise.

:class:`Sampling` checks the call, encodes the condition with the conditioner the bundle routes
its kind to (``_encode``), applies the guidance in embedding space, draws the noise
(:func:`noise`) and records the provenance; the subclass runs the network on a batch
(``_images``): :class:`~hygeia_gan.plugin.GanGenerator` with torch,
:class:`~hygeia_gan._frozen.FrozenGan` with an ONNX graph.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from hygeia.api import GeneratedImage
from hygeia.errors import InputError
from hygeia.noise import TorchGenerator
from hygeia.validation import check_condition, check_guidance_scale, check_n, check_seed, condition_kind
from hygeia.vocab import CHEST_FOV_MM as FOV_MM
from hygeia.vocab import finding

NAME, VERSION = "gan", "1.0.0"
SIZE = 64
MAX_N = 20_000  # one call keeps n float32 64x64 images in memory (~16 kB each)
MAX_BATCH = 4096
MAX_GUIDANCE = 20.0
NO_NEGATIVE = "none"
"""``negative_condition`` value that guides away from the null (unconditional) condition."""
DEFAULT_GUIDANCE, DEFAULT_NEGATIVE = 3.0, "normal"
"""Sampling defaults the trainer records in new bundles (``config["sampling"]``). A bundle without
them samples unguided (scale 1). Shipped bundle, ``hygeia evaluate generator gan -n 200``: scale
1 -> 0.794, 2.5 -> 0.875, 3 -> 0.906, 4 -> 0.934 conditional accuracy (see docs/plugins/gan.md)."""


def _progress(total: int, what: str, progress: Any) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``progress``: a callback ``(done, total)``, True (a tqdm bar), or None/False (silent)."""
    if callable(progress):
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            progress(done[0], total)
        return step, (lambda: None)
    if not progress:
        return (lambda k: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=what, unit="img")
    return bar.update, bar.close


def _check_sampling(batch_size: Any, truncation: Any) -> None:
    """InputError for a ``batch_size`` outside [1, MAX_BATCH] or a ``truncation`` outside [0.5, 4]."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise InputError("batch_size", f"an integer in [1, {MAX_BATCH}]", got=repr(batch_size))
    if truncation is not None and (isinstance(truncation, bool) or not isinstance(truncation, (int, float))
                                   or not 0.5 <= truncation <= 4.0):
        raise InputError("truncation", "a number in [0.5, 4] or None", got=repr(truncation))


def noise(n: int, z_dim: int, seed: int, truncation: float | None) -> np.ndarray:
    """``float32 [n, z_dim]`` standard normal noise, row ``i`` of a CPU ``torch.Generator(seed)``
    (:class:`hygeia.noise.TorchGenerator`); with ``truncation``, values beyond it are redrawn from
    the same generator (up to 100 rounds) and what is left is clipped."""
    g = TorchGenerator(seed)
    z = g.randn(n, z_dim)
    if truncation is not None:
        for _ in range(100):
            bad = np.abs(z) > truncation
            if not bad.any():
                break
            z[bad] = g.randn(int(bad.sum()))
        z = np.clip(z, -truncation, truncation)
    return z


class Sampling:
    """``generate`` of the ``gan`` model; subclasses set the attributes below, ``_encode`` and ``_images``."""

    output = "image"
    config: dict[str, Any]
    conditioners: dict[str, dict[str, Any]]
    route: dict[str, str]
    condition_kinds: frozenset[str]
    defaults: dict[str, Any]
    identity: Any
    z_dim: int
    device: Any = "cpu"

    def _encode(self, cname: str, value: str) -> np.ndarray:
        """Conditioner ``cname``'s vector ``float32 [1, D]`` for one label or text."""
        raise NotImplementedError

    def _images(self, z: np.ndarray, conds: dict[str, np.ndarray]) -> np.ndarray:
        """Images ``float32 [B, 1, 64, 64]`` in [0, 1] for noise ``[B, z_dim]`` and one ``[1, D]`` row per conditioner."""
        raise NotImplementedError

    def condition_vectors(self, condition: Any) -> tuple[dict[str, np.ndarray], str, str | None]:
        """``({conditioner: [1, D]}, kind, conditioner name)`` for one condition; the null
        condition is all zeros (and no conditioner)."""
        kind = check_condition(condition, self.condition_kinds, NAME)
        conds = {k: np.zeros((1, int(v["dim"])), np.float32) for k, v in self.conditioners.items()}
        if kind == "none":
            return conds, kind, None
        cname = self.route[kind]
        value = finding(condition).label if kind == "label" else condition.strip()
        conds[cname] = np.asarray(self._encode(cname, value), np.float32).reshape(1, -1)
        return conds, kind, cname

    def guided_vectors(
        self, condition: Any, guidance_scale: float | None = None, negative_condition: str | None = None,
    ) -> tuple[dict[str, np.ndarray], str, str | None, float, str | None]:
        """Condition vectors with guidance applied: ``(vectors, kind, conditioner, scale, negative)``.

        Guidance in embedding space: the generator embeds its condition vectors linearly (a sum
        of one linear map per conditioner), so ``base + s * (c - base)`` per conditioner
        embeds to ``e_base + s * (e_c - e_base)``: the condition is pushed further away from the
        ``negative_condition`` (a label or text; ``"none"``: the null condition, i.e. plain
        classifier-free guidance), as diffusers' ``negative_prompt``. Scale 1 is no guidance, 0 the
        negative condition itself. The null condition, and a condition equal to its negative
        (``normal`` with the negative ``normal``), are left unguided; the returned scale and
        negative then read 1.0 and None.
        """
        scale = check_guidance_scale(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                                     MAX_GUIDANCE)
        negative = self.defaults["negative_condition"] if negative_condition is None else negative_condition
        if not isinstance(negative, str):
            raise InputError("negative_condition", f"a finding label, a text prompt or {NO_NEGATIVE!r}",
                             got=repr(negative))
        conds, kind, cname = self.condition_vectors(condition)
        if kind == "none" or scale == 1.0:
            return conds, kind, cname, 1.0, None
        if negative.strip().lower() in ("", NO_NEGATIVE):
            base = {k: np.zeros_like(v) for k, v in conds.items()}
            negative = NO_NEGATIVE
        else:
            if condition_kind(negative) not in self.route:
                raise InputError("negative_condition", f"a condition {NAME!r} takes ({', '.join(sorted(self.route))}) "
                                 f"or {NO_NEGATIVE!r}", got=repr(negative)[:200])
            base = self.condition_vectors(negative)[0]
        if all(np.array_equal(conds[k], base[k]) for k in conds):
            return conds, kind, cname, 1.0, None
        s = np.float32(scale)
        return {k: base[k] + s * (v - base[k]) for k, v in conds.items()}, kind, cname, scale, negative

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], None] | bool | None = None, batch_size: int = 256,
                 truncation: float | None = None, guidance_scale: float | None = None,
                 negative_condition: str | None = None, **options: Any) -> list[GeneratedImage]:
        """``n`` synthetic images of ``condition`` (a finding label, a text prompt, or None).

        ``guidance_scale`` in [0, 20] and ``negative_condition`` (default: the bundle's sampling
        defaults, shipped: 3 away from ``normal``; 1 = unguided): see :meth:`guided_vectors`.
        ``truncation``: resample noise values with ``|z| > truncation`` (0.5..4; None = off):
        lower gives more typical, less diverse images. ``progress``: a callback
        ``progress(done, total)`` called after each batch, or True for a progress bar.
        """
        if options:
            raise InputError("options", "batch_size, truncation, guidance_scale, negative_condition or progress",
                             got=", ".join(sorted(options)))
        n = check_n(n, max_n=MAX_N)
        seed = check_seed(seed)
        _check_sampling(batch_size, truncation)
        conds, kind, cname, scale, negative = self.guided_vectors(condition, guidance_scale, negative_condition)
        z = noise(n, self.z_dim, seed, truncation)
        update, close = _progress(n, "gan: sampling", progress)
        out: list[GeneratedImage] = []
        prov = self._provenance(cname, kind, truncation, scale, negative)
        spacing = (FOV_MM / SIZE, FOV_MM / SIZE)
        try:
            for s in range(0, n, batch_size):
                x = self._images(z[s:s + batch_size], conds)
                for j in range(x.shape[0]):
                    out.append(GeneratedImage(
                        pixels=np.ascontiguousarray(x[j], dtype=np.float32), pixel_spacing=spacing,
                        modality="DX", seed=seed, condition=condition, model=self.identity,
                        provenance={**prov, "index": s + j, "device": str(self.device)}))
                update(x.shape[0])
        finally:
            close()
        return out

    def _provenance(self, cname: str | None, kind: str, truncation: float | None, scale: float,
                    negative: str | None) -> dict[str, Any]:
        """What every image of one ``generate`` call records (its index and device are added per image)."""
        return {"generator": NAME, "generator_version": VERSION, "conditioner": cname,
                "conditioner_version": None if cname is None else self.conditioners[cname].get("version"),
                "condition_kind": kind,
                "truncation": truncation, "guidance_scale": scale, "negative_condition": negative,
                "weights_sha256": self.identity.weights_sha256,
                "training": {k: self.config.get(k) for k in ("seed", "epochs", "phantom_difficulty")}}


def routes(conditioners: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Which conditioner takes each condition kind (first listed wins: label -> label, text -> text)."""
    route: dict[str, str] = {}
    for cname, info in conditioners.items():
        for kind in info["kinds"]:
            route.setdefault(kind, cname)
    return route


def sampling_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A bundle config's sampling defaults (no key: unguided)."""
    sampling = config.get("sampling", {})
    return {"guidance_scale": float(sampling.get("guidance_scale", 1.0)),
            "negative_condition": str(sampling.get("negative_condition", NO_NEGATIVE))}
