"""Model bundles: safetensors weights + JSON config + JSON model card, in one folder.

Layout::

    BUNDLE/
      model.safetensors   the weights (safetensors: no pickle, ever)
      config.json         everything needed to rebuild the network (architecture, sizes, ...)
      model_card.json     intended use, training data, metrics, limitations

A bundle is written into a temporary sibling folder and renamed into place, so an interrupted
save never leaves a half-written bundle behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .api import ModelCard
from .errors import BundleError, InputError
from .outputs import atomic_dir, current_umask

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "model_card.json"


@dataclass
class Bundle:
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    card: ModelCard
    sha256: str  # SHA-256 of model.safetensors: the weights' identity in every output


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: ModelCard,
    extra: Mapping[str, bytes] | None = None,
) -> str:
    """Write a bundle atomically (replacing any old one) and return the weights' SHA-256.

    ``extra``: more files for the bundle folder (name -> bytes), such as a training run's
    ``metrics.csv`` and curve PNG; they are written in the same atomic step.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(weights, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        (tmp / CARD).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
        for name, data in (extra or {}).items():
            if Path(name).name != name or name in (WEIGHTS, CONFIG, CARD):
                raise BundleError(f"model bundle {path}: extra file name {name!r} (a plain name, not a bundle part)")
            (tmp / name).write_bytes(data)
        mask = current_umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
    return sha256_file(path / WEIGHTS)


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle; BundleError names the missing or corrupt part."""
    path = Path(path)
    for part in (WEIGHTS, CONFIG, CARD):
        if not (path / part).is_file():
            raise BundleError(f"model bundle {path}: missing {part} (expected {WEIGHTS}, {CONFIG}, {CARD})")
    try:
        tensors = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as exc:
        raise BundleError(f"model bundle {path}: cannot read {WEIGHTS}: {exc}") from exc
    try:
        config = json.loads((path / CONFIG).read_text())
        card = ModelCard.from_dict(json.loads((path / CARD).read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"model bundle {path}: bad {CONFIG} or {CARD}: {exc}") from exc
    return Bundle(path, tensors, config, card, sha256_file(path / WEIGHTS))


def pick_device(preferred: str | torch.device | None = None) -> torch.device:
    """``preferred`` if given, else CUDA when available, else CPU (chosen at run time).

    A device this machine does not have (``cuda`` without a CUDA GPU, ``cuda:3`` on a one-GPU
    host, ``mps`` off Apple silicon) or a name torch does not know raises :class:`InputError`.
    """
    if preferred is None or (isinstance(preferred, str) and not preferred.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "cpu, cuda, cuda:N or mps"
    try:
        dev = preferred if isinstance(preferred, torch.device) else torch.device(str(preferred).strip())
    except (RuntimeError, ValueError, TypeError):
        raise InputError("device", expected, got=repr(preferred)) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError("device", "cpu (this machine has no CUDA device)", got=repr(str(preferred)))
        if dev.index is not None and dev.index >= n:
            raise InputError("device", f"cuda:0 to cuda:{n - 1}", got=repr(str(preferred)))
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device", "cpu or cuda (MPS is not available here)", got=repr(str(preferred)))
    elif dev.type != "cpu":
        raise InputError("device", expected, got=repr(str(preferred)))
    return dev
