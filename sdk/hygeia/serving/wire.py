"""The Triton wire format of Hygeia models: conversions between plugin results
(``Diagnosis``, ``GeneratedImage``, ...) and tensors.

The tensor names, dtypes and shapes are declared once, in :mod:`hygeia.tensors`; this module
encodes and decodes their contents and is used by both sides: the server adapter
(:mod:`hygeia.serving.adapter`) encodes, the remote plugins (:mod:`hygeia.serving.remote`)
decode. Pure numpy: importing this module needs neither Triton nor torch. The format is
documented in ``docs/serving.md``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np

from ..api import (
    Diagnosis,
    Finding,
    GeneratedImage,
    GeneratedMolecule,
    ModelIdentity,
    Region,
)
from ..errors import InputError, UnsupportedConditionError
from ..tensors import (  # noqa: F401  (the names, re-exported for the adapter and the client)
    CONDITION,
    EMBEDDING,
    HEATMAPS,
    IMAGES,
    META,
    OPTIONS,
    PROBS,
    PROGRESS,
    REGIONS,
    SEED,
    SMILES,
    TEXTS,
    THRESHOLDS,
    VALID,
    N,
)
from ..vocab import Code, finding

MAX_TEXT_BYTES = 16_384
"""Longest accepted text (a condition, a prompt, a clinical history) in UTF-8 bytes."""

PARAM_PREFIX = "hygeia_"



def model_name(kind: str, name: str) -> str:
    """The Triton model name of a plugin: ``<kind>_<name>`` (names are unique per kind only)."""
    return f"{kind}_{name}"


# --------------------------------------------------------------------------- strings
def encode_strings(values: Sequence[str]) -> np.ndarray:
    """UTF-8 ``BYTES`` tensor ``[B, 1]`` from strings."""
    return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)


def decode_strings(arr: np.ndarray | None, name: str, max_bytes: int = MAX_TEXT_BYTES) -> list[str]:
    """Strings from a ``BYTES`` tensor ``[B]`` or ``[B, 1]``; InputError naming ``name`` if not UTF-8 or too long."""
    if arr is None:
        return []
    flat = np.asarray(arr, dtype=np.object_).reshape(len(arr), -1)
    if flat.shape[1] != 1:
        raise InputError(name, "one string per batch item (shape [B, 1])", got=f"shape {list(np.shape(arr))}")
    out: list[str] = []
    for i, v in enumerate(flat[:, 0]):
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        if len(b) > max_bytes:
            raise InputError(f"{name}[{i}]", f"UTF-8 text of at most {max_bytes} bytes", got=f"{len(b)} bytes")
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{name}[{i}]", "UTF-8 text", got="bytes that are not valid UTF-8") from None
    return out


def encode_condition(condition: Any) -> str | None:
    """A condition as wire text: None -> None (input left out); str as is; dict -> JSON object."""
    if condition is None:
        return None
    if isinstance(condition, str):
        return condition
    if isinstance(condition, Mapping):
        return json.dumps(dict(condition), sort_keys=True)
    raise UnsupportedConditionError("condition", "None, a string (label or text) or a dict of property targets",
                                    got=f"{type(condition).__name__} {condition!r}"[:200])


def decode_condition(text: str | None) -> Any:
    """Inverse of :func:`encode_condition` (text that is a JSON object becomes a dict)."""
    if text is None:
        return None
    s = text.strip()
    if s.startswith("{"):
        try:
            value = json.loads(s)
        except json.JSONDecodeError:
            return text
        if isinstance(value, dict):
            return value
    return text


def _identity_from_json(d: Mapping[str, Any]) -> ModelIdentity:
    return ModelIdentity(d["name"], d["version"], d["kind"], d.get("weights_sha256"))


# --------------------------------------------------------------------------- diagnoser
def encode_region(region: Region | None) -> bytes:
    if region is None:
        return b""
    return json.dumps({"kind": region.kind, "coords": [[float(x), float(y)] for x, y in region.coords]},
                      separators=(",", ":")).encode()


def decode_region(raw: bytes) -> Region | None:
    if not raw:
        return None
    d = json.loads(raw)
    return Region(d["kind"], tuple((float(x), float(y)) for x, y in d["coords"]))


def encode_diagnoses(diagnoses: Sequence[Diagnosis], labels: Sequence[str],
                     heatmaps: bool = True) -> dict[str, np.ndarray]:
    """Output tensors for ``diagnoses`` (one per image), findings in the order of ``labels``.

    A finding a Diagnosis lacks gets probability NaN; ``heatmaps=False`` leaves them out.
    """
    b, f = len(diagnoses), len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    probs = np.full((b, f), np.nan, np.float32)
    thr = np.full((b, f), np.nan, np.float32)
    regions = np.full((b, f), b"", dtype=np.object_)
    maps: list[tuple[int, int, np.ndarray]] = []
    for i, d in enumerate(diagnoses):
        for fd in d.findings:
            j = index.get(fd.label)
            if j is None:
                continue
            probs[i, j], thr[i, j] = fd.probability, fd.threshold
            regions[i, j] = encode_region(fd.region)
            if heatmaps and fd.heatmap is not None:
                maps.append((i, j, np.asarray(fd.heatmap, np.float32)))
    if maps:
        h, w = maps[0][2].shape
        hm = np.full((b, f, h, w), np.nan, np.float32)
        for i, j, m in maps:
            hm[i, j] = m
    else:
        hm = np.zeros((b, f, 0, 0), np.float32)
    return {PROBS: probs, THRESHOLDS: thr, HEATMAPS: hm, REGIONS: regions}


def _code(label: str, codes: Mapping[str, Mapping[str, str]]) -> Code:
    if label in codes:
        return Code(**codes[label])
    return finding(label).code


def decode_diagnoses(outputs: Mapping[str, np.ndarray | None], labels: Sequence[str],
                     identity: ModelIdentity, image_size: tuple[int, int],
                     codes: Mapping[str, Mapping[str, str]] | None = None) -> list[Diagnosis]:
    """Rebuild Diagnosis objects; codes come from ``codes`` (config) or :mod:`hygeia.vocab`."""
    probs, thr = outputs[PROBS], outputs[THRESHOLDS]
    assert probs is not None and thr is not None
    regions = outputs.get(REGIONS)
    hm = outputs.get(HEATMAPS)
    codes = codes or {}
    out: list[Diagnosis] = []
    for i in range(probs.shape[0]):
        findings: list[Finding] = []
        for j, lab in enumerate(labels):
            p = float(probs[i, j])
            if math.isnan(p):
                continue
            heat = None
            if hm is not None and hm.ndim == 4 and hm.shape[2] > 0 and not np.isnan(hm[i, j]).all():
                heat = np.array(hm[i, j], np.float32)
            raw = regions[i, j] if regions is not None else b""
            findings.append(Finding(lab, _code(lab, codes), p, float(thr[i, j]),
                                    region=decode_region(raw), heatmap=heat))
        out.append(Diagnosis(findings, identity, tuple(image_size)))  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- generator
def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, Mapping):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
        return repr(x)


def encode_generated(items: Sequence[GeneratedImage] | Sequence[GeneratedMolecule]) -> dict[str, np.ndarray]:
    """Output tensors of one generate() call: ``[1, n, ...]`` (batch of one request)."""
    meta: list[bytes] = []
    for it in items:
        m: dict[str, Any] = {"seed": int(it.seed), "condition": _jsonable(it.condition), "model": asdict(it.model)}
        if isinstance(it, GeneratedImage):
            m.update(pixel_spacing=list(it.pixel_spacing), modality=it.modality,
                     provenance=_jsonable(it.provenance), synthetic=True)
        else:
            m.update(properties=_jsonable(it.properties))
        meta.append(json.dumps(m, separators=(",", ":")).encode())
    out: dict[str, np.ndarray] = {META: np.array([meta], dtype=np.object_)}
    if items and isinstance(items[0], GeneratedMolecule):
        out[SMILES] = np.array([[it.smiles.encode() for it in items]], dtype=np.object_)  # type: ignore[union-attr]
        out[VALID] = np.array([[bool(it.valid) for it in items]], dtype=bool)  # type: ignore[union-attr]
    else:
        out[IMAGES] = np.stack([np.asarray(it.pixels, np.float32) for it in items])[None] if items \
            else np.zeros((1, 0, 1, 1, 1), np.float32)
    return out


def decode_generated(outputs: Mapping[str, np.ndarray | None], served_by: str = ""
                     ) -> list[GeneratedImage] | list[GeneratedMolecule]:
    """Rebuild the items of one generate() call from its final response."""
    meta = [json.loads(m) for m in np.asarray(outputs[META]).reshape(-1)]
    if outputs.get(SMILES) is not None:
        smiles = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(outputs[SMILES]).reshape(-1)]
        valid = np.asarray(outputs[VALID]).reshape(-1)
        return [GeneratedMolecule(s, bool(v), m["seed"], m["condition"], _identity_from_json(m["model"]),
                                  properties=dict(m.get("properties", {})))
                for s, v, m in zip(smiles, valid, meta)]
    imgs = np.asarray(outputs[IMAGES])
    imgs = imgs.reshape(imgs.shape[-4:]) if imgs.ndim == 5 else imgs
    items: list[GeneratedImage] = []
    for px, m in zip(imgs, meta):
        prov = dict(m.get("provenance", {}))
        if served_by:
            prov.setdefault("served_by", served_by)
        items.append(GeneratedImage(np.array(px, np.float32), tuple(m["pixel_spacing"]), m["modality"],  # type: ignore[arg-type]
                                    m["seed"], m["condition"], _identity_from_json(m["model"]), prov))
    return items
