"""Built-in ``fusion`` diagnoser: MONAI ResNet vision encoder + frozen all-MiniLM-L6-v2 language
encoder + co-attention fusion + multi-label finding head, with per-finding heat maps and regions.

Registered through the ``hygeia`` entry point ``fusion = "hygeia_fusion"``, like any third-party
plugin. Heavy imports (torch, MONAI, transformers) happen only when the plugin is created.
"""
from __future__ import annotations

from typing import Any

from hygeia import hookimpl
from hygeia import tensors
from hygeia.api import PluginSpec
from hygeia.vocab import FINDING_LABELS

NAME, VERSION = "fusion", "1.0.0"


def _factory(**options: Any) -> Any:
    from .diagnoser import FusionDiagnoser

    return FusionDiagnoser(**options)


def _train(**options: Any) -> Any:
    from .training import train

    return train(**options)


def _shipped(name: str) -> dict[str, Any] | None:
    """A JSON file of the shipped bundle (``config.json``, ``model_card.json``), or None."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(__file__).parent / "weights" / "fusion" / name).read_text())
    except (OSError, ValueError):
        return None


def _shipped_size() -> int:
    """Input size (pixels per side) of the shipped weights, from their config (64 when absent)."""
    try:
        return int((_shipped("config.json") or {})["input_size"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 64


SIZE = _shipped_size()


def _card() -> Any:
    """The shipped bundle's model card (metrics measured at training), else the static one."""
    from hygeia.api import ModelCard

    data = _shipped("model_card.json")
    if data is not None:
        try:
            return ModelCard.from_dict(data)
        except (ValueError, TypeError, KeyError):
            pass
    from .training import card

    return card()


SPEC = PluginSpec(
    kind="diagnoser",
    name=NAME,
    version=VERSION,
    description=("Vision (MONAI ResNet) + language (frozen all-MiniLM-L6-v2) co-attention fusion: 5 chest findings "
                 f"from a {SIZE}x{SIZE} image and an optional clinical history line, with heat maps and regions"),
    factory=_factory,
    **tensors.diagnoser(channels=1, size=(SIZE, SIZE), findings=len(FINDING_LABELS)),
    model_card=_card(),
    train=_train,
)


@hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    yield SPEC
