"""The ``vae`` bundle's identity, model card and sampling settings, shared by :mod:`hygeia_vae.plugin`
and :mod:`hygeia_vae.train` (split out so that the trainer does not import the plugin module,
whose spec imports the trainer lazily: an import circle otherwise)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hygeia.api import ModelCard
from hygeia.errors import InputError
from hygeia.vocab import CHEST_FOV_MM as FOV_MM

NAME, VERSION = "vae", "1.0.0"
SIZE = 64
"""Image side in pixels (64x64, one channel)."""
WEIGHTS = Path(__file__).parent / "weights" / NAME
PIXEL_SPACING = (FOV_MM / SIZE, FOV_MM / SIZE)
MAX_N = 4096
"""Most images one ``generate`` call may return (a 64x64 float32 image is 16 KiB; latents are tiny)."""
MAX_GUIDANCE = 20.0
GUIDES = ("flow", "mean")
"""How the trainer's mixture or Gaussian priors are guided: ``flow`` (the default: flow-paired,
with a conditional flow trained beside the prior) or ``mean`` (the mean shift)."""
PRIOR_KINDS = ("flow", "pca-gmm", "gaussian")
"""Label priors the trainer fits: ``pca-gmm`` (the default: a Gaussian mixture in the label's top
principal directions), ``gaussian`` (low-rank plus diagonal) or ``flow`` (experimental: a
conditional normalizing flow, :class:`hygeia_vae.model.FlowPrior`)."""
DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_TEMPERATURE = 7.0, "normal", 1.1
"""Sampling defaults the trainer records in new bundles (``config["sampling"]``); a bundle without
them samples unguided (scale 1). See docs/plugins/vae.md for the measurements."""

CARD = ModelCard(
    intended_use=(
        "Synthetic 64x64 chest-radiograph phantoms conditioned on a finding label, for testing "
        "pipelines and data augmentation research; the latent space of the diffusion plugin. "
        "Not for clinical use; every output is marked synthetic."
    ),
    training_data=(
        "Hygeia phantoms (hygeia_lab.phantoms.make_phantom_set, split 'train', 64x64, default difficulty): "
        "an equal number per condition label (normal + 5 findings), one finding per image."
    ),
    metrics={},
    limitations=(
        "Knows only the phantom domain at 64x64. Samples are smoother than real phantoms (a VAE "
        "decoder averages detail). Sampled by default with flow-paired guidance 7 away from 'normal' "
        "and temperature 1.1, which draws findings more conspicuously than real phantoms show them: "
        "the cnn judge sees consolidation, effusion, cardiomegaly and pneumothorax on 94-100 % of "
        "samples and nodules on about 2 in 3 (real phantoms: 92-100 %, and 1 in 2), and calls a "
        "finding on 2 'normal' samples in 3 (1 in 8 real normals). "
        "Faint nodules and thin pneumothorax lines are partly lost in the 16x16 latent. "
        "Co-occurring findings are not modelled."
    ),
)


def card_with(metrics: dict[str, Any]) -> ModelCard:
    """:data:`CARD` with measured ``metrics`` (what the trainer writes into a bundle)."""
    return ModelCard(CARD.intended_use, CARD.training_data, metrics, CARD.limitations, CARD.license)


def check_temperature(temperature: Any) -> None:
    """Raise InputError unless ``temperature`` is a number in (0, 2]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise InputError("temperature", "a number in (0, 2]", got=repr(temperature))
