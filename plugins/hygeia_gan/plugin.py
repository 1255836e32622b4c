"""The ``gan`` generator: a conditional GAN for 64x64 grayscale chest-radiograph phantoms.

Conditioned through conditioner plugins: the shipped bundle was trained with the ``label``
conditioner (finding labels) and the ``text`` conditioner (free-text prompts) at once, so
``generate(n, "effusion")`` and ``generate(n, "chest radiograph with a pleural effusion")`` both
work; ``condition=None`` (or "") is unconditional. Networks: :mod:`hygeia_gan.model`; ``generate``,
guidance and noise, shared with the frozen runner: :mod:`hygeia_gan._sampling`; serving without
torch: :mod:`hygeia_gan._freeze` and :mod:`hygeia_gan._frozen`; trainer (``hygeia train gan``):
:mod:`hygeia_gan.train`, which the spec names and which only training imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia import tensors
from hygeia.api import ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle

from ._sampling import NAME, VERSION, Sampling, routes, sampling_defaults
from .model import Generator

WEIGHTS = Path(__file__).parent / "weights" / "gan"
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


class GanGenerator(Sampling):
    """``generate(n, condition, seed) -> list[GeneratedImage]``: float32 ``[1, 64, 64]`` in [0, 1].

    ``bundle``: weights to load (default: the shipped ones); ``device``: "cpu", "cuda", ... (default:
    CUDA when available). Image ``i`` of a call depends only on ``seed``, ``i`` and the condition
    (its noise is row ``i`` of a CPU ``torch.Generator`` seeded with ``seed``), so the first ``k``
    images of ``generate(n, c, s)`` equal ``generate(k, c, s)``.
    """

    freeze_probes = [{"truncation": 1.0}, {"negative_condition": "right pleural effusion", "batch_size": 1}]
    """Options :func:`hygeia.frozen.check_generator` also compares the frozen runner on."""

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
        self.route = routes(self.conditioners)
        self.condition_kinds = frozenset({"none", *self.route})
        self._cond_objs: dict[str, Any] = {}
        self.defaults = sampling_defaults(cfg)
        self.z_dim = int(self.net.z_dim)

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

    def _encode(self, cname: str, value: str) -> np.ndarray:
        return self._conditioner(cname).encode([value]).float().cpu().numpy()

    def _images(self, z: np.ndarray, conds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            zb = torch.from_numpy(np.ascontiguousarray(z)).to(self.device)
            cb = {k: torch.from_numpy(v).to(self.device).expand(zb.shape[0], -1) for k, v in conds.items()}
            return self.net(zb, cb).float().clamp(0, 1).cpu().numpy()

    def freeze(self, folder: Path) -> str:
        """Save this model's sampling for serving without torch (:mod:`hygeia.frozen`): the
        generator network as an ONNX graph and its conditioners, each frozen in turn; returns the
        runner, :class:`~hygeia_gan._frozen.FrozenGan`."""
        from ._freeze import freeze

        return freeze(self, Path(folder))

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
