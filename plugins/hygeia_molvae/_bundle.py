"""The ``molecule-vae`` bundle's identity and model card, shared by :mod:`hygeia_molvae.plugin` and
:mod:`hygeia_molvae.train` (split out so that the trainer does not import the plugin module,
whose spec imports the trainer lazily: an import circle otherwise)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hygeia.api import ModelCard

NAME, VERSION = "molecule-vae", "1.0.0"
WEIGHTS = Path(__file__).parent / "weights" / NAME


def make_card(metrics: dict[str, Any], data_desc: str) -> ModelCard:
    """The model card of a trained bundle: measured ``metrics``, training data ``data_desc``."""
    return ModelCard(
        intended_use="Research and demonstration: sample drug-like molecules (SMILES), optionally "
                     "steered toward logP/QED/SA/MW targets. Not for clinical or safety decisions.",
        training_data=data_desc,
        metrics=metrics,
        limitations="Trained briefly on CPU; samples follow MOSES (250-350 Da, no charges, no stereo). "
                    "Some samples are invalid SMILES (flagged valid=False). Property conditioning "
                    "shifts distributions, it does not guarantee the target.",
    )
