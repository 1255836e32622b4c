"""Freezing the conditioners for serving without torch (:mod:`hygeia.frozen`): the label table
as safetensors, the text encoder as ONNX with its tokenizer (:func:`hygeia.text.export_encoder`),
and for ``property`` nothing (its encoding is code; the identity is in ``frozen.json``, written by
:func:`hygeia.frozen.freeze`); runners in :mod:`hygeia_conditioners._frozen`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _write(folder: Path, **config: Any) -> None:
    (folder / "conditioner.json").write_text(json.dumps(config, indent=1))


def freeze_label(plugin: Any, folder: Path) -> str:
    from safetensors.numpy import save_file

    save_file({"embedding": plugin.table.detach().float().cpu().numpy()}, str(folder / "table.safetensors"))
    _write(folder, labels=list(plugin.labels))
    return "hygeia_conditioners._frozen:FrozenLabel"


def freeze_text(plugin: Any, folder: Path) -> str:
    from hygeia.text import export_encoder

    _write(folder, **export_encoder(folder))
    return "hygeia_conditioners._frozen:FrozenText"


def freeze_property(plugin: Any, folder: Path) -> str:  # noqa: ARG001 - the same signature as the others
    return "hygeia_conditioners._frozen:FrozenProperty"
