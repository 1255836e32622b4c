"""The ``fusion`` diagnoser: image + clinical text -> coded findings with heat maps and regions.

``FusionDiagnoser.diagnose(images, texts=None)`` runs the :class:`~hygeia_fusion.model.FusionNet`
on chest-radiograph images of its bundle's ``input_size`` (256x256 shipped; grayscale ``[B,1,H,W]``
or RGB ``[B,3,H,W]``, float in [0, 1]), with one clinical history/indication line per image or none
(image-only mode). Text is encoded by the frozen shared encoder (:mod:`hygeia.text`,
all-MiniLM-L6-v2), truncated with a warning past its 128-token limit.

Localisation: each finding's evidence map (half the input size: 128x128 for the shipped 256 px
weights, trained against the phantoms' finding masks) is upsampled bilinearly to the image size and
min-max scaled to [0, 1]: that is the heat map. A bundle with a localiser (the shipped one, for
nodules: :mod:`hygeia_fusion._localiser`) takes that finding's map from the localiser instead.
The peak becomes the finding's region: a point for nodules; for the other findings the convex hull
of the heat map's connected part at >= 50% of the peak around it (a closed polyline). Regions are
given for findings called present (probability >= threshold).

This module also holds the model card (:func:`card`) and the plugin's ``SPEC``; the trainer is
:mod:`hygeia_fusion.train`, named by the spec and imported only when training starts.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from hygeia import tensors
from hygeia.api import Diagnosis, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import BundleError, InputError
from hygeia.validation import check_images, check_texts
from hygeia.vocab import FINDING_LABELS, bundle_codes

from ._baselines import PREFIX as BASELINES
from .model import FusionNet, encode_texts, encoder_identity
from ._results import diagnoses

NAME, VERSION = "fusion", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / "fusion"
INPUT_SIZE = (64, 64)

RegionKind = Literal["auto", "point", "polygon", "none"]


class FusionDiagnoser:
    """Vision (MONAI ResNet) + language (frozen all-MiniLM-L6-v2) co-attention finding classifier.

    Options: ``bundle`` (other weights than the shipped ones), ``device`` (default: CUDA if
    available), ``resize`` (False: images of another size than ``input_size`` are rejected; True: they are
    resized with :func:`hygeia.data.io.prepare_image`, MONAI area/bilinear ``Resize``), ``regions``
    (``auto``: nodule -> point, others -> polygon; ``point``; ``polygon``; ``none``),
    ``use_text`` (False: always image-only, texts are ignored).
    """

    findings: tuple[str, ...] = FINDING_LABELS
    input_size: tuple[int, int] = INPUT_SIZE
    condition_kinds = frozenset({"text", "none"})

    def __init__(self, bundle: str | Path | None = None, device: str | None = None, resize: bool = False,
                 regions: RegionKind = "auto", use_text: bool = True, batch_size: int = 256) -> None:
        if regions not in ("auto", "point", "polygon", "none"):
            raise InputError("regions", "one of auto, point, polygon, none", got=repr(regions))
        path = Path(bundle) if bundle is not None else WEIGHTS
        self.device = pick_device(device)
        b = load_bundle(path)
        self.config: dict[str, Any] = b.config
        self.card = b.card
        self.findings = tuple(self.config.get("findings", FINDING_LABELS))  # a user-trained bundle: its own
        arch = dict(self.config["architecture"])
        arch["widths"] = tuple(arch["widths"])
        self.net = FusionNet(**arch)
        self._baseline_tensors = {k: v for k, v in b.tensors.items() if k.startswith(BASELINES)}
        try:
            self.net.load_state_dict({k: v for k, v in b.tensors.items() if not k.startswith(BASELINES)}, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"model bundle {path}: weights do not fit the fusion architecture: {exc}") from exc
        self.net.to(self.device).eval()
        self.thresholds = np.asarray(self.config["thresholds"], np.float32)
        self.thresholds_no_text = np.asarray(self.config.get("thresholds_no_text", self.thresholds), np.float32)
        if self.thresholds.shape != (len(self.findings),) or self.thresholds_no_text.shape != self.thresholds.shape:
            raise BundleError(f"model bundle {path}: expected {len(self.findings)} thresholds")
        self.max_tokens = int(self.config.get("max_tokens", 128))
        size = self.config.get("input_size", INPUT_SIZE)
        self.input_size = (int(size[0]), int(size[1]))
        self.identity = ModelIdentity(NAME, VERSION, "diagnoser", b.sha256)
        self.resize, self.regions, self.use_text, self.batch_size = bool(resize), regions, bool(use_text), int(batch_size)
        self.codes = bundle_codes(self.config, self.findings)
        self._check_encoder()

    def _check_encoder(self) -> None:
        want = self.config.get("text_encoder", {}).get("sha256")
        if not want or not self.use_text:
            return
        try:
            have = encoder_identity()["sha256"]
        except Exception:  # the encoder is loaded (and fails clearly) on the first text
            return
        if have != want:
            warnings.warn(f"fusion: the installed text encoder ({have[:12]}) is not the one the weights were "
                          f"trained with ({want[:12]}); text results may be off", stacklevel=3)

    # ------------------------------------------------------------------ inputs
    def _images(self, images: Any) -> np.ndarray:
        if not self.resize:
            return check_images(images, size=self.input_size, channels=1, name="images")
        a = check_images(images, size=None, channels=1, name="images")
        if tuple(a.shape[2:]) == self.input_size:
            return a
        from hygeia.data.io import prepare_image

        return np.stack([prepare_image(im[0], size=self.input_size) for im in a]).astype(np.float32)

    # ------------------------------------------------------------------ core
    def predict(self, images: Any, texts: Sequence[str] | None = None,
                maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[B, 5]`` and heat maps ``[B, 5, H, W]`` in [0, 1] (or None)."""
        a = self._images(images)
        tx = check_texts(texts, len(a), name="texts")
        if not self.use_text or (tx is not None and not any(t.strip() for t in tx)):
            tx = None
        probs, heat = [], []
        with torch.inference_mode():
            for i in range(0, len(a), self.batch_size):
                x = torch.from_numpy(a[i:i + self.batch_size]).to(self.device)
                states = mask = None
                if tx is not None:
                    states, mask = encode_texts(tx[i:i + self.batch_size], self.max_tokens)
                    pad = self.max_tokens - states.shape[1]  # one shape for every batch (compiled graphs)
                    states, mask = F.pad(states, (0, 0, 0, pad)), F.pad(mask, (0, pad))
                    states, mask = states.to(self.device), mask.to(self.device)
                out = self.net(x, states, mask)
                probs.append(torch.sigmoid(out["logits"]).float().cpu().numpy())
                if maps:
                    m = F.interpolate(out["maps"], size=self.input_size, mode="bilinear", align_corners=False)
                    lo = m.amin(dim=(2, 3), keepdim=True)
                    hi = m.amax(dim=(2, 3), keepdim=True)
                    heat.append(((m - lo) / (hi - lo).clamp(min=1e-6)).float().cpu().numpy())
        return np.concatenate(probs), (np.concatenate(heat) if maps else None)

    def diagnose(self, images: Any, texts: Sequence[str] | None = None, heatmaps: bool = True) -> list[Diagnosis]:
        """One :class:`~hygeia.api.Diagnosis` per image; ``texts``: one line per image, or None."""
        probs, heat = self.predict(images, texts, maps=True)
        tx = check_texts(texts, len(probs), name="texts") if self.use_text else None
        return diagnoses(probs, heat, tx, self, self.identity, heatmaps)

    def export_module(self) -> list[tuple[torch.nn.Module, Any]]:
        """The networks :meth:`predict` runs, for compiled execution (:mod:`hygeia.compiled`): the
        fusion network, called with text states and mask (padded to ``max_tokens``, so one graph
        serves every text) and with images alone; and the frozen text encoder (token length dynamic)."""
        x = torch.zeros(1, 1, *self.input_size)
        states = torch.zeros(1, self.max_tokens, self.net.text_proj[0].in_features)
        mask = torch.zeros(1, self.max_tokens, dtype=torch.long)
        mask[:, :12] = 1
        out: list[tuple[torch.nn.Module, Any]] = [(self.net, [(x, states, mask), (x, None, None)])]
        if self.use_text:
            from hygeia.compiled import Dynamic
            from hygeia.text import load_encoder, tokenize

            _, encoder = load_encoder()
            tok = tokenize(["fever and productive cough for three days, CRP 120"], max_tokens=self.max_tokens)
            out.append((encoder, [(Dynamic(tok.input_ids, (1,)), Dynamic(tok.attention_mask, (1,)))]))
        return out

    def freeze(self, folder: Path) -> str:
        """Save this model's inference for serving without torch (:mod:`hygeia.frozen`): ONNX
        graphs, tokenizer, thresholds; returns the runner, :class:`~hygeia_fusion._frozen.FrozenFusion`."""
        from ._freeze import freeze

        return freeze(self, Path(folder))

    def baselines(self) -> dict[str, Any]:
        """The bundle's baselines as diagnosers (``text_only``, ``late_fusion``; empty when it has
        none): what the lab's ``evaluate diagnoser fusion`` table compares the fusion with."""
        cfg = self.config.get("baselines")
        if not cfg or not self._baseline_tensors:
            return {}
        from ._baselines import BaselineDiagnoser, build

        mods = build(cfg, len(self.findings))
        for name, mod in mods.items():
            pre = f"{BASELINES}{name}."
            mod.load_state_dict({k[len(pre):]: v for k, v in self._baseline_tensors.items() if k.startswith(pre)})
            mod.to(self.device).eval()
        return {kind: BaselineDiagnoser(kind, mods, cfg["thresholds"][kind], self) for kind in ("text_only", "late_fusion")}

    def save(self, path: str | Path) -> str:
        """Write these weights as a bundle (trainable weights only; the text encoder is recorded)."""
        return save_bundle(path, {**self.net.state_dict(), **self._baseline_tensors}, self.config, self.card)


def card(metrics: dict[str, Any] | None = None, n_train: int = 8000, maps: int = 64, size: int = 256,
         look: tuple[float, float] = (2.0, 0.0), command: str = "") -> ModelCard:
    """The model card the trainer writes (``n_train``, ``size``, ``look``: the phantoms' difficulty
    and look-alike rate, the trainer's defaults; ``command``: the command that reproduces the weights)."""
    return ModelCard(
        intended_use=("Research and software testing: multi-label finding detection (nodule, consolidation, "
                      f"effusion, cardiomegaly, pneumothorax) on {size}x{size} chest-radiograph-like images, optionally "
                      "helped by the clinical history/indication line, with per-finding heat maps and regions. "
                      "Not for clinical use."),
        training_data=(f"{n_train} synthetic phantoms (hygeia_lab.phantoms.make_phantom_set, split 'train', difficulty "
                       f"{look[0]:g}, look-alikes {look[1]:g}) with their generated clinical indication text; thresholds and model selection "
                       "on 1000 'val' phantoms. No patient data." + (f" Reproduce with: {command}" if command else "")),
        metrics=dict(metrics or {}),
        limitations=("Trained only on synthetic phantoms: performance on real radiographs is unknown. The text "
                     "encoder (all-MiniLM-L6-v2, frozen) reads English indications; text past 128 tokens is "
                     f"truncated. Heat maps are {maps}x{maps} evidence maps upsampled to {size}x{size}: small nodules are "
                     "localised to within a few pixels at best."),
    )


def _shipped(name: str) -> dict[str, Any] | None:
    """A JSON file of the shipped bundle (``config.json``, ``model_card.json``), or None."""
    try:
        return json.loads((WEIGHTS / name).read_text())
    except (OSError, ValueError):
        return None


def _shipped_size() -> int:
    """Input size (pixels per side) of the shipped weights, from their config (64 when absent)."""
    try:
        return int((_shipped("config.json") or {})["input_size"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 64


def _shipped_card() -> ModelCard:
    """The shipped bundle's model card (metrics measured at training), else the static one."""
    data = _shipped("model_card.json")
    if data is not None:
        try:
            return ModelCard.from_dict(data)
        except (ValueError, TypeError, KeyError):
            pass
    return card()


SIZE = _shipped_size()

SPEC = PluginSpec(
    kind="diagnoser",
    name=NAME,
    version=VERSION,
    description=("Vision (MONAI ResNet) + language (frozen all-MiniLM-L6-v2) co-attention fusion: 5 chest findings "
                 f"from a {SIZE}x{SIZE} image and an optional clinical history line, with heat maps and regions"),
    factory=FusionDiagnoser,
    **tensors.diagnoser(channels=1, size=(SIZE, SIZE), findings=len(FINDING_LABELS)),
    model_card=_shipped_card(),
    train="hygeia_fusion.train:train",
)
