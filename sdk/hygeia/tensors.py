"""The tensors a plugin serves: one description per plugin kind, declared once.

A plugin's :class:`~hygeia.api.PluginSpec` takes its ``inputs`` and ``outputs`` from the
functions here (``**tensors.diagnoser(channels=1, size=(64, 64), findings=5)``); the Triton
config (:mod:`hygeia.serving.repository`), the wire encoding (:mod:`hygeia.serving.wire`), the
remote client (:mod:`hygeia.serving.remote`) and the table in ``docs/serving.md`` all derive
from these names, dtypes and shapes. ``dims`` exclude the batch dimension; -1 is a variable size.

- conditioner: ``CONDITION`` BYTES [1] -> ``EMBEDDING`` FP32 [D]
- diagnoser: ``IMAGES`` FP32 [C, H, W], ``TEXTS`` BYTES [1] (optional) -> ``PROBS`` FP32 [F],
  ``THRESHOLDS`` FP32 [F], ``HEATMAPS`` FP32 [F, h, w] (h = w = 0: none), ``REGIONS`` BYTES [F]
- generator (decoupled: one request is one ``generate`` call, batch 1): ``N`` INT64 [1],
  ``SEED`` INT64 [1], ``CONDITION`` BYTES [1] (optional), ``OPTIONS`` BYTES [1] (optional) ->
  ``PROGRESS`` INT64 [2] and, in the last response, ``META`` BYTES [n] with ``IMAGES`` FP32
  [n, C, H, W] or ``SMILES`` BYTES [n] + ``VALID`` BOOL [n].
"""
from __future__ import annotations

from typing import Literal, Sequence

from .api import Kind, TensorSpec

CONDITION, EMBEDDING = "CONDITION", "EMBEDDING"
IMAGES, TEXTS = "IMAGES", "TEXTS"
PROBS, THRESHOLDS, HEATMAPS, REGIONS = "PROBS", "THRESHOLDS", "HEATMAPS", "REGIONS"
N, SEED, OPTIONS, PROGRESS, SMILES, VALID, META = "N", "SEED", "OPTIONS", "PROGRESS", "SMILES", "VALID", "META"

Tensors = dict[str, tuple[TensorSpec, ...]]


def conditioner(dim: int) -> Tensors:
    """A conditioner's tensors: one condition text in, a ``[dim]`` embedding out."""
    return {
        "inputs": (TensorSpec(CONDITION, "BYTES", (1,),
                              description="a finding label, free text or JSON property targets, UTF-8"),),
        "outputs": (TensorSpec(EMBEDDING, "FP32", (int(dim),), description="condition embedding"),),
    }


def diagnoser(channels: int, size: Sequence[int], findings: int) -> Tensors:
    """A diagnoser's tensors for ``channels`` x ``size`` (rows, columns) images and ``findings`` findings."""
    h, w = (int(x) for x in size)
    f = int(findings)
    return {
        "inputs": (
            TensorSpec(IMAGES, "FP32", (int(channels), h, w), description="image in [0, 1]"),
            TensorSpec(TEXTS, "BYTES", (1,), optional=True,
                       description="clinical history or indication, UTF-8 (ignored by image-only diagnosers)"),
        ),
        "outputs": (
            TensorSpec(PROBS, "FP32", (f,), description="probability per finding, in the diagnoser's order"),
            TensorSpec(THRESHOLDS, "FP32", (f,), description="decision threshold per finding"),
            TensorSpec(HEATMAPS, "FP32", (f, -1, -1),
                       description="heat map per finding in [0, 1]; 0 x 0: none; all NaN: none for that finding"),
            TensorSpec(REGIONS, "BYTES", (f,),
                       description='region per finding: empty, or JSON {"kind": "box", "coords": [[x, y], ...]}'),
        ),
    }


def generator(output: Literal["image", "molecule"] = "image") -> Tensors:
    """A generator's tensors (decoupled: a stream of PROGRESS responses, results in the last one)."""
    if output == "molecule":
        results = (TensorSpec(SMILES, "BYTES", (-1,), description="one SMILES per molecule"),
                   TensorSpec(VALID, "BOOL", (-1,), description="whether RDKit parses it"))
    else:
        results = (TensorSpec(IMAGES, "FP32", (-1, -1, -1, -1), description="synthetic images [n, C, H, W] in [0, 1]"),)
    return {
        "inputs": (
            TensorSpec(N, "INT64", (1,), description="how many items (one generate() call)"),
            TensorSpec(SEED, "INT64", (1,), description="random seed: same seed, same output"),
            TensorSpec(CONDITION, "BYTES", (1,), optional=True,
                       description="a finding label, free text or JSON property targets; absent: unconditional"),
            TensorSpec(OPTIONS, "BYTES", (1,), optional=True, description="JSON object of generate() options"),
        ),
        "outputs": (
            TensorSpec(PROGRESS, "INT64", (2,), description="(done, total)"),
            TensorSpec(META, "BYTES", (-1,), description="JSON per item: seed, condition, spacing, provenance, model"),
            *results,
        ),
    }


def for_kind(kind: Kind, **sizes: object) -> Tensors:
    """The tensors of a plugin of ``kind`` (keyword arguments as for the function of that kind)."""
    return {"conditioner": conditioner, "diagnoser": diagnoser, "generator": generator}[kind](**sizes)  # type: ignore[operator]


def markdown_table() -> str:
    """The served tensors of every kind as a Markdown table (what ``docs/serving.md`` shows)."""
    rows = ["| kind | direction | name | dtype | dims | optional | meaning |", "|---|---|---|---|---|---|---|"]
    examples: list[tuple[str, Tensors]] = [
        ("conditioner", conditioner(dim=-1)), ("diagnoser", diagnoser(channels=-1, size=(-1, -1), findings=-1)),
        ("generator (image)", generator("image")), ("generator (molecule)", generator("molecule"))]
    for kind, t in examples:
        for direction in ("inputs", "outputs"):
            for spec in t[direction]:
                dims = "[" + ", ".join(str(d) for d in spec.dims) + "]"
                rows.append(f"| {kind} | {direction[:-1]} | `{spec.name}` | {spec.dtype} | {dims} | "
                            f"{'yes' if spec.optional else ''} | {spec.description} |")
    return "\n".join(rows) + "\n"
