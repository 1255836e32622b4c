"""Freezing the conditioners for serving without torch (:mod:`hygeia.frozen`): the label table
as safetensors, the text encoder as ONNX with its tokenizer (:func:`hygeia.text.export_encoder`),
and for ``property`` only its identity; runners in :mod:`hygeia_conditioners._frozen`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _write(folder: Path, plugin: Any, **extra: Any) -> None:
    ident = plugin.identity
    (folder / "conditioner.json").write_text(json.dumps({
        "identity": {"name": ident.name, "version": ident.version, "weights_sha256": ident.weights_sha256},
        **extra}, indent=1))


def freeze_label(plugin: Any, folder: Path) -> str:
    from safetensors.numpy import save_file

    save_file({"embedding": plugin.table.detach().float().cpu().numpy()}, str(folder / "table.safetensors"))
    _write(folder, plugin, labels=list(plugin.labels))
    return "hygeia_conditioners._frozen:FrozenLabel"


def freeze_text(plugin: Any, folder: Path) -> str:
    from hygeia.text import export_encoder

    _write(folder, plugin, **export_encoder(folder))
    return "hygeia_conditioners._frozen:FrozenText"


def freeze_property(plugin: Any, folder: Path) -> str:
    _write(folder, plugin)
    return "hygeia_conditioners._frozen:FrozenProperty"
