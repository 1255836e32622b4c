"""The ``cnn`` diagnoser: chest radiograph -> finding probabilities, Grad-CAM heat maps, regions.

Image-only: clinical text is accepted (and checked) but not used. The network
(:class:`~hygeia_cnn.model.CnnNet`) is a small MONAI ``ResNet``. A bundle's config says what the
model reads and reports: ``input_size``, ``findings`` (the phantom findings for the shipped
bundle, the user's label columns for one trained with ``hygeia train cnn --data``) and their
``codes`` (SNOMED CT, for the SR); per-finding thresholds were chosen on a validation split
(Youden's J). Heat maps are class activation maps on the config's ``cam_layer``, computed in one
forward pass (:meth:`CnnDiagnoser.gradcam`): ``cam: "gradcam"`` (the default) gives
``monai.visualize.GradCAM``'s maps, ``cam: "hirescam"`` weights each activation by its own gradient
(HiResCAM, Draelos & Carin 2020) instead of the map's mean gradient; a present finding gets a box
around the hottest blob of its heat map. This module also holds the model card and the plugin's ``SPEC``; the trainer is
:mod:`hygeia_cnn.train`, named by the spec and imported only when training starts.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hygeia import tensors
from hygeia.api import Diagnosis, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import InputError
from hygeia.validation import check_heatmaps, check_images, check_texts
from hygeia.vocab import FINDING_LABELS, bundle_codes

from .model import CAM_METHODS, DEFAULT_ARCH, CnnNet, _minmax
from ._results import diagnoses, region_from_heatmap  # noqa: F401  (region_from_heatmap: part of this module's API)

NAME, VERSION = "cnn", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / "cnn"
CXR_NAME = "cxr"
CXR_WEIGHTS = Path(__file__).parent / "weights" / "cxr"

CARD = ModelCard(
    intended_use=("Demonstration and test diagnoser for the Hygeia SDK: flags nodule, consolidation, effusion, "
                  "cardiomegaly and pneumothorax on 64x64 synthetic chest-radiograph phantoms. Not for clinical use."),
    training_data="Synthetic phantoms only (hygeia_lab.phantoms.make_phantom_set, split 'train'); thresholds on split 'val'.",
    metrics={},
    limitations=("Trained and measured on procedural phantoms, never on patient images: its numbers say nothing about "
                 "real radiographs. Image-only (ignores clinical text). Grad-CAM regions are coarse (16x16 feature map)."),
)


def _shipped(weights: Path, name: str) -> dict[str, Any]:
    """A JSON file of a shipped bundle ({} if none is shipped)."""
    import json

    try:
        return dict(json.loads((weights / name).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


_SHIPPED = _shipped(WEIGHTS, "config.json")
INPUT_SIZE: tuple[int, int] = tuple(_SHIPPED.get("input_size", (64, 64)))  # type: ignore[assignment]
"""The shipped ``cnn`` bundle's input size (what the served model reads)."""


def _shipped_card(weights: Path = WEIGHTS) -> ModelCard:
    """A shipped bundle's model card (its measured metrics), or the static card if none is shipped."""
    try:
        return ModelCard.from_dict(_shipped(weights, "model_card.json"))
    except (ValueError, KeyError, TypeError):
        return CARD


class CnnDiagnoser:
    """``diagnose(images [B,1,H,W] float in [0,1], texts=None) -> list[Diagnosis]`` with ``(H, W)``
    the bundle's ``input_size`` and one finding per entry of its ``findings``."""

    name, default_weights = NAME, WEIGHTS
    max_batch_size = 64  # the largest batch Triton forms (1 MiB of images; 64 was the best in-process batch)
    heatmap_modes = (False, True, "present")
    """What ``diagnose(heatmaps=...)`` takes besides None; ``"present"``: maps for present findings only."""

    def __init__(self, bundle: str | Path | None = None, device: str | None = None, heatmaps: bool = True,
                 batch_size: int = 256) -> None:
        self.device = pick_device(device)
        b = load_bundle(bundle or self.default_weights)
        self.config = dict(b.config)
        self.card = b.card
        self.arch = {**DEFAULT_ARCH, **self.config.get("arch", {})}
        if self.arch.get("cam", "gradcam") not in CAM_METHODS:
            raise InputError("arch.cam", f"one of {', '.join(CAM_METHODS)}", got=repr(self.arch.get("cam")))
        self.findings: tuple[str, ...] = tuple(self.config.get("findings", FINDING_LABELS))
        h, w = (int(v) for v in self.config.get("input_size", INPUT_SIZE))
        self.input_size: tuple[int, int] = (h, w)
        self.codes = bundle_codes(self.config, self.findings)
        self.net = CnnNet(self.arch, n_out=len(self.findings))
        self.net.load_state_dict(b.tensors)
        self.net.to(self.device).eval()
        self.thresholds = np.asarray(self.config.get("thresholds", [0.5] * len(self.findings)), np.float64)
        self.heatmaps = bool(heatmaps)
        self.batch_size = int(batch_size)
        self.identity = ModelIdentity(self.name, VERSION, "diagnoser", b.sha256)

    # -- inference ------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: Any) -> np.ndarray:
        """Probabilities float32 ``[B, F]`` (``findings`` order); the same input checks as diagnose."""
        x = check_images(images, size=self.input_size)
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = torch.from_numpy(x[i:i + self.batch_size]).to(self.device)
            out.append(torch.sigmoid(self.net(xb)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def gradcam(self, images: Any, classes: Sequence[int] | None = None, where: np.ndarray | None = None) -> np.ndarray:
        """Class activation maps float32 ``[B, F, H, W]`` in [0, 1] (zeros for classes not asked for).

        ``where`` (bool ``[B, F]``) asks for the maps of each image's own True classes only. One
        forward pass of the whole network gives the ``cam_layer`` activations; then the images are
        grouped by how many classes they ask for, and each group of ``c`` runs the network's tail
        (the stages after ``cam_layer``, pooling, head) once with gradients and takes ``c``
        backward passes back to ``cam_layer``, each pass one class per image (an image's gradient
        depends on that image alone). So an image takes part in as many passes as it has classes
        and costs the same in a batch as alone; images with none take no pass.

        ``arch["cam"]`` ``"gradcam"`` (default): the maps of ``monai.visualize.GradCAM`` on
        ``cam_layer`` (activations weighted by their spatially averaged gradients, ReLU, bilinear
        upsampling, per-image min-max; tested equal). ``"hirescam"``: each activation times its own
        gradient, summed over channels (HiResCAM), then the same steps; with the max branch of the
        ``avgmax`` pooling it keeps the location the logit took its evidence from, which the
        averaged gradient spreads over the map. monai instead runs a full forward and backward
        pass per class (5x the work, most of it in the full-resolution first stage).
        """
        x = torch.from_numpy(check_images(images, size=self.input_size)).to(self.device)
        if where is None:
            where = np.zeros((len(x), len(self.findings)), bool)
            where[:, [int(k) for k in (classes if classes is not None else range(len(self.findings)))]] = True
        with torch.no_grad():
            _, acti = self.net.features(x, self.arch["cam_layer"])
        return self._cams(acti, np.asarray(where, bool))

    def _cams(self, acti: torch.Tensor, where: np.ndarray) -> np.ndarray:
        """The maps of ``where``'s True classes from the ``cam_layer`` activations (see :meth:`gradcam`)."""
        from monai.visualize.visualizer import default_upsampler

        maps = np.zeros((len(acti), len(self.findings), *self.input_size), np.float32)
        hires, layer = self.arch.get("cam", "gradcam") == "hirescam", self.arch["cam_layer"]
        counts = where.sum(1)
        for c in sorted(set(counts.tolist()) - {0}):
            group = np.flatnonzero(counts == c)
            own = np.stack([np.flatnonzero(where[g]) for g in group])  # [G, c]: each image's classes
            a = acti[torch.from_numpy(group).to(acti.device)].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.net.tail(a, layer)
                rows = torch.arange(len(group), device=a.device)
                for r in range(c):
                    target = logits[rows, torch.from_numpy(own[:, r]).to(a.device)].sum()
                    (grad,) = torch.autograd.grad(target, a, retain_graph=r + 1 < c)
                    weight = grad if hires else grad.mean(dim=(2, 3), keepdim=True)
                    cam = torch.relu((weight * a).sum(1, keepdim=True)).detach()
                    cam = _minmax(default_upsampler(self.input_size)(cam))
                    maps[group, own[:, r]] = np.nan_to_num(cam[:, 0].float().cpu().numpy()).clip(0, 1)
        return maps

    def _probs_and_maps(self, x: np.ndarray, want: bool | str) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and heat maps (every finding's, or ``"present"``: the present ones') from one
        forward pass per batch: the maps start from the very activations the probabilities came from."""
        probs = np.zeros((len(x), len(self.findings)), np.float32)
        maps = np.zeros((len(x), len(self.findings), *self.input_size), np.float32)
        for i in range(0, len(x), self.batch_size):
            xb = torch.from_numpy(x[i:i + self.batch_size]).to(self.device)
            with torch.no_grad():
                logits, acti = self.net.features(xb, self.arch["cam_layer"])
            p = torch.sigmoid(logits).float().cpu().numpy()
            probs[i:i + len(xb)] = p
            where = p >= self.thresholds[None, :] if want == "present" else np.ones(p.shape, bool)
            maps[i:i + len(xb)] = self._cams(acti, where)
        return probs, maps

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool | str | None = None
                 ) -> list[Diagnosis]:
        """One Diagnosis per image. ``heatmaps``: None = the plugin's default (``heatmaps`` of the
        constructor), False = none, True = a map per finding, ``"present"`` = maps only for the
        findings called present (the others' ``heatmap`` is None): the same regions for a fraction
        of the maps' cost, what the PACS gateway asks for (:attr:`heatmap_modes`)."""
        x = check_images(images, size=self.input_size)
        check_texts(texts, len(x))  # accepted and checked; this model is image-only
        check_heatmaps(heatmaps, self.heatmap_modes)
        want = self.heatmaps if heatmaps is None else heatmaps
        probs, maps = self._probs_and_maps(x, want) if want else (self.predict_proba(x), None)
        return diagnoses(probs, maps, want, self, self.identity)

    def freeze(self, folder: Path) -> str:
        """Save this model's inference, heat maps included, for serving without torch
        (:mod:`hygeia.frozen`); returns the runner, :class:`~hygeia_cnn._frozen.FrozenCnn`."""
        from ._freeze import freeze

        return freeze(self, Path(folder))

    def save(self, path: str | Path) -> str:
        """Write the current weights, config and model card as a bundle; returns the weights' SHA-256."""
        return save_bundle(path, self.net.state_dict(), self.config, self.card)


class CxrDiagnoser(CnnDiagnoser):
    """The ``cxr`` diagnoser: ResNet-18 at 256 px (``ARCH_256``), trained from labelled files."""

    name, default_weights = CXR_NAME, CXR_WEIGHTS
    max_batch_size = 32


def _spec(name: str, weights: Path, factory: Any, train: str, default: bool, summary: str) -> PluginSpec:
    """The spec of a shipped bundle: its served tensors come from the bundle's config."""
    cfg = _shipped(weights, "config.json")
    h, w = (int(v) for v in cfg.get("input_size", (64, 64)))
    cam = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}.get(cfg.get("arch", {}).get("cam", "gradcam"), "CAM")
    return PluginSpec(kind="diagnoser", name=name, version=VERSION,
                      description=f"{summary} (MONAI ResNet, {h}x{w}) with {cam} regions", factory=factory,
                      **tensors.diagnoser(channels=1, size=(h, w), findings=len(cfg.get("findings", FINDING_LABELS))),
                      model_card=_shipped_card(weights), train=train, default=default)


SPEC = _spec(NAME, WEIGHTS, CnnDiagnoser, "hygeia_cnn.train:train", False,
             "Image-only multi-label chest finding classifier for 64 px phantoms, the generators' judge")
CXR_SPEC = _spec(CXR_NAME, CXR_WEIGHTS, CxrDiagnoser, "hygeia_cnn.train:train_cxr", True,
                 "Image-only multi-label chest radiograph finding classifier, the default diagnoser")
