"""The ``gan`` generator: a conditional GAN for 64x64 grayscale chest-radiograph phantoms.

Conditioned through conditioner plugins: the shipped bundle was trained with the ``label``
conditioner (finding labels) and the ``text`` conditioner (free-text prompts) at once, so
``generate(n, "effusion")`` and ``generate(n, "chest radiograph with a pleural effusion")`` both
work; ``condition=None`` (or "") is unconditional. Networks: :mod:`hygeia_gan.model`; trainer
(``hygeia train gan``): :mod:`hygeia_gan.train`, which the spec names and which only training imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import GeneratedImage, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_condition, check_guidance_scale, check_n, check_seed, condition_kind
from hygeia.vocab import CHEST_FOV_MM as FOV_MM
from hygeia.vocab import finding

from .model import Generator

NAME, VERSION = "gan", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / "gan"
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
CARD = ModelCard(
    intended_use="Research and software testing: synthetic 64x64 chest-radiograph phantoms with a "
                 "requested finding (label or free text). Not for clinical use; never real patients.",
    training_data="Hygeia phantoms (hygeia_lab.phantoms.make_phantom_set, split 'train', default difficulty), "
                  "an equal number per condition: normal and each of the five findings alone.",
    metrics={},
    limitations="64x64 grayscale only. Learned one finding at a time (no co-occurring findings). "
                "Trained 36 epochs on a CPU (resize-convolution generator, AC-GAN and mode-seeking "
                "terms). Sampled by default with guidance 3 away from 'normal' (embedding-space "
                "guidance): the cnn judge then sees the requested finding on 100 % of consolidation, "
                "effusion, cardiomegaly and pneumothorax samples and on about 4 nodule samples in 5 "
                "(1 in 2 real nodules); guidance exaggerates findings and moves samples away from "
                "real phantoms (Frechet 28 unguided, 43 guided). Unguided (guidance_scale=1), nodules "
                "are fainter than real ones (found on 1 sample in 4). 'normal' is never guided: the "
                "judge calls a finding on about 4 of its samples in 10 (1 in 8 real normals). "
                "Diversity matches real phantoms (MS-SSIM 0.62 vs 0.61). Text conditioning saw 20 "
                "phrasings per condition: other phrasings, unrelated or negated text condition weakly "
                "or map to an arbitrary mixture; text prompts for 'normal' are guided away from the "
                "label 'normal' too, which hurts them (judge: 0.45 guided, 0.66 unguided).",
)


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


def _noise(n: int, z_dim: int, seed: int, truncation: float | None) -> torch.Tensor:
    """``[n, z_dim]`` standard normal noise, row ``i`` of a CPU ``torch.Generator(seed)``; with
    ``truncation``, values beyond it are redrawn from the same generator (up to 100 rounds) and what
    is left is clamped."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=g)
    if truncation is not None:
        for _ in range(100):
            bad = z.abs() > truncation
            if not bad.any():
                break
            z[bad] = torch.randn(int(bad.sum()), generator=g)
        z = z.clamp(-truncation, truncation)
    return z


class GanGenerator:
    """``generate(n, condition, seed) -> list[GeneratedImage]``: float32 ``[1, 64, 64]`` in [0, 1].

    ``bundle``: weights to load (default: the shipped ones); ``device``: "cpu", "cuda", ... (default:
    CUDA when available). Image ``i`` of a call depends only on ``seed``, ``i`` and the condition
    (its noise is row ``i`` of a CPU ``torch.Generator`` seeded with ``seed``), so the first ``k``
    images of ``generate(n, c, s)`` equal ``generate(k, c, s)``.
    """

    output = "image"

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        b = load_bundle(bundle or WEIGHTS)
        cfg = b.config
        self.config = cfg
        self.conditioners: dict[str, dict[str, Any]] = cfg["conditioners"]
        dims = {k: int(v["dim"]) for k, v in self.conditioners.items()}
        self.device = pick_device(device)
        self.net = Generator(dims, z_dim=cfg["z_dim"], embed_dim=cfg["embed_dim"], ch=cfg["g_ch"],
                             upsampling=cfg.get("upsampling", "transposed"))  # no key: transposed
        self.net.load_state_dict(b.tensors, strict=True)
        self.net.to(self.device).eval()
        self.identity = ModelIdentity(NAME, VERSION, "generator", b.sha256)
        self.card = b.card
        # which conditioner takes each condition kind (first listed wins: label -> label, text -> text)
        self.route: dict[str, str] = {}
        for cname, info in self.conditioners.items():
            for kind in info["kinds"]:
                self.route.setdefault(kind, cname)
        self.condition_kinds = frozenset({"none", *self.route})
        self._cond_objs: dict[str, Any] = {}
        sampling = cfg.get("sampling", {})  # no key: unguided
        self.defaults = {"guidance_scale": float(sampling.get("guidance_scale", 1.0)),
                         "negative_condition": str(sampling.get("negative_condition", NO_NEGATIVE))}

    def _conditioner(self, name: str) -> Any:
        if name not in self._cond_objs:
            from hygeia.plugins import get_registry

            self._cond_objs[name] = get_registry().create("conditioner", name)
        return self._cond_objs[name]

    def export_module(self) -> tuple[torch.nn.Module, tuple[Any, ...]]:
        """The generator network and how :meth:`generate` calls it (noise ``[B, z_dim]`` and one
        ``[B, D]`` row per conditioner, zeros where unconditioned), for compiled execution
        (:mod:`hygeia.compiled`)."""
        conds = {k: torch.zeros(1, int(v["dim"])) for k, v in self.conditioners.items()}
        return self.net, (torch.zeros(1, self.net.z_dim), conds)

    def condition_vectors(self, condition: Any) -> tuple[dict[str, torch.Tensor], str, str | None]:
        """``({conditioner: [1, D]}, kind, conditioner name)`` for one condition; the null
        condition is all zeros (and no conditioner)."""
        kind = check_condition(condition, self.condition_kinds, NAME)
        conds = {k: torch.zeros(1, int(v["dim"])) for k, v in self.conditioners.items()}
        if kind == "none":
            return conds, kind, None
        cname = self.route[kind]
        value = finding(condition).label if kind == "label" else condition.strip()
        conds[cname] = self._conditioner(cname).encode([value]).float().cpu()
        return conds, kind, cname

    def guided_vectors(
        self, condition: Any, guidance_scale: float | None = None, negative_condition: str | None = None,
    ) -> tuple[dict[str, torch.Tensor], str, str | None, float, str | None]:
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
            base = {k: torch.zeros_like(v) for k, v in conds.items()}
            negative = NO_NEGATIVE
        else:
            if condition_kind(negative) not in self.route:
                raise InputError("negative_condition", f"a condition {NAME!r} takes ({', '.join(sorted(self.route))}) "
                                 f"or {NO_NEGATIVE!r}", got=repr(negative)[:200])
            base = self.condition_vectors(negative)[0]
        if all(torch.equal(conds[k], base[k]) for k in conds):
            return conds, kind, cname, 1.0, None
        return {k: base[k] + scale * (v - base[k]) for k, v in conds.items()}, kind, cname, scale, negative

    def generate(
        self,
        n: int,
        condition: Any = None,
        seed: int = 0,
        progress: Callable[[int, int], None] | bool | None = None,
        batch_size: int = 256,
        truncation: float | None = None,
        guidance_scale: float | None = None,
        negative_condition: str | None = None,
        **options: Any,
    ) -> list[GeneratedImage]:
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
        z = _noise(n, self.net.z_dim, seed, truncation)
        update, close = _progress(n, "gan: sampling", progress)
        out: list[GeneratedImage] = []
        prov = self._provenance(cname, kind, truncation, scale, negative)
        spacing = (FOV_MM / SIZE, FOV_MM / SIZE)
        try:
            with torch.inference_mode():
                for s in range(0, n, batch_size):
                    zb = z[s:s + batch_size].to(self.device)
                    cb = {k: v.to(self.device).expand(zb.shape[0], -1) for k, v in conds.items()}
                    x = self.net(zb, cb).float().clamp(0, 1).cpu().numpy()
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

    def save(self, path: str | Path) -> str:
        """Write the generator's weights as a bundle (safetensors + config + model card)."""
        return save_bundle(path, self.net.state_dict(), self.config, self.card)


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Conditional GAN (projection discriminator, spectral norm, hinge loss): 64x64 chest "
                "phantoms from a finding label or a text prompt, via the label and text conditioners",
    factory=GanGenerator,
    **tensors.generator("image"),
    model_card=CARD,
    train="hygeia_gan.train:train",
)
