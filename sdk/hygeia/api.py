"""The three plugin kinds (protocols), their typed specs, and the result dataclasses.

Everything a plugin returns is a plain dataclass from this module, so that local plugins,
remote (Triton) plugins and integrations (DICOM SR, Secondary Capture) share one vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .vocab import Code

Kind = Literal["generator", "conditioner", "diagnoser"]
KINDS: tuple[Kind, ...] = ("generator", "conditioner", "diagnoser")


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as a server sees it.

    ``dims`` exclude the batch dimension; -1 marks a variable size. ``dtype`` uses Triton's
    names: ``FP32``, ``INT64``, ``BYTES`` (UTF-8 strings), ``BOOL``.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    description: str = ""


@dataclass(frozen=True)
class ModelCard:
    """What a model is for and how far to trust it (after Mitchell et al., 'Model Cards')."""

    intended_use: str
    training_data: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    limitations: str = ""
    license: str = "Apache-2.0"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        keys = ("intended_use", "training_data", "metrics", "limitations", "license")
        return cls(**{k: d[k] for k in keys if k in d})


@dataclass(frozen=True)
class PluginSpec:
    """A named registration returned by a ``hygeia_*`` hook.

    ``factory(**options)`` builds the plugin object; trainable plugins accept
    ``bundle=PATH`` to load other weights than the shipped ones.
    """

    kind: Kind
    name: str
    version: str
    description: str
    factory: Callable[..., Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_card: ModelCard
    package: str = ""  # filled in by the plugin manager: the distribution that registered it
    train: Callable[..., Any] | str | None = None
    """Optional trainer ``train(out=PATH, seed=0, progress=True, **options) -> PATH`` that trains the
    model reproducibly and writes a bundle (what ``hygeia train NAME`` runs): the function, or its
    ``"package.module:function"`` name, imported only when training starts (so serving a plugin
    never imports its trainer); :meth:`trainer` returns the function."""
    default: bool = False
    """Offer this plugin as its kind's default when the user names none (see
    :meth:`hygeia.plugins.PluginRegistry.default_name`)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"PluginSpec.kind: expected one of {KINDS}, got {self.kind!r}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"PluginSpec.name: expected a non-empty [A-Za-z0-9_-] name, got {self.name!r}")
        if isinstance(self.train, str) and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.train):
            raise ValueError(f"PluginSpec.train: expected a function or 'package.module:function', got {self.train!r}")

    def trainer(self) -> Callable[..., Any] | None:
        """The trainer function (imported now when ``train`` names it), or None."""
        if self.train is None or callable(self.train):
            return self.train
        import importlib

        module, _, attr = str(self.train).partition(":")
        try:
            return getattr(importlib.import_module(module), attr or "train")
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"PluginSpec.train of {self.name!r}: cannot load {self.train!r}: {exc}") from None

    def metadata(self) -> dict[str, Any]:
        """JSON-able description (what ``hygeia plugins --json`` prints)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "package": self.package,
            "description": self.description,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "model_card": self.model_card.to_dict(),
            "default": self.default,
        }


@dataclass(frozen=True)
class OutputFormat:
    """A writer for results, registered by ``hygeia_output_formats`` (e.g. DICOM SR, SC).

    ``write(results, out, **context)`` writes ``results`` (a list of ``Diagnosis`` when
    ``accepts == "diagnosis"``, of ``GeneratedImage`` when ``"images"``) to ``out`` and returns
    the paths written. ``context`` carries ``sources`` (the source files or datasets, one per
    result, or None).
    """

    name: str
    accepts: Literal["diagnosis", "images"]
    description: str
    write: Callable[..., list[Any]]
    package: str = ""
    suffixes: tuple[str, ...] = ()
    """File suffixes (``".png"``) that select this format when the output is one file."""
    build: Callable[..., list[Any]] | None = None
    """Optional ``build(results, **context)``: the objects ``write`` would write, in memory (for
    example pydicom Datasets), for callers that send rather than store them (the PACS gateway)."""


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a result: recorded in every output (SR, SC, provenance)."""

    name: str
    version: str
    kind: Kind
    weights_sha256: str | None = None  # None for models with no weights (procedural)


@dataclass
class GeneratedImage:
    """A synthetic image. ``pixels``: float32 ``[C, H, W]`` in [0, 1]. Always synthetic."""

    pixels: np.ndarray
    pixel_spacing: tuple[float, float]  # (row, column) spacing in mm
    modality: str  # DICOM modality of what it imitates: "DX", "CT", "MR"
    seed: int
    condition: Any
    model: ModelIdentity
    provenance: dict[str, Any] = field(default_factory=dict)
    synthetic: bool = field(default=True, init=False)  # never False: generated is synthetic


@dataclass
class GeneratedMolecule:
    """A generated molecule as SMILES; ``valid`` says whether RDKit parses it."""

    smiles: str
    valid: bool
    seed: int
    condition: Any
    model: ModelIdentity
    properties: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Region:
    """Where a finding is, in pixel coordinates of the diagnosed image.

    Coordinates are ``(x, y)`` = (column, row) pairs in DICOM's convention (the top-left corner
    of the top-left pixel is (0, 0)). ``point``: one pair; ``box``: two pairs (top-left,
    bottom-right); ``polyline``: a closed polygon, first pair repeated at the end.
    """

    kind: Literal["point", "box", "polyline"]
    coords: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        need = {"point": 1, "box": 2}.get(self.kind)
        if self.kind not in ("point", "box", "polyline"):
            raise ValueError(f"Region.kind: expected point, box or polyline, got {self.kind!r}")
        if need is not None and len(self.coords) != need:
            raise ValueError(f"Region.coords: a {self.kind} needs {need} (x, y) pairs, got {len(self.coords)}")
        if self.kind == "polyline" and (len(self.coords) < 4 or self.coords[0] != self.coords[-1]):
            raise ValueError("Region.coords: a polyline needs >= 4 pairs, closed (first == last)")

    def contains(self, x: float, y: float) -> bool:
        """Whether the point (x, y) lies in the region (a point region: within 1 pixel)."""
        if self.kind == "point":
            (px, py), = self.coords
            return abs(px - x) <= 1 and abs(py - y) <= 1
        if self.kind == "box":
            (x0, y0), (x1, y1) = self.coords
            return x0 <= x <= x1 and y0 <= y <= y1
        inside = False  # even-odd ray casting over the closed polygon
        for (x0, y0), (x1, y1) in zip(self.coords[:-1], self.coords[1:]):
            if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
                inside = not inside
        return inside

    def center(self) -> tuple[float, float]:
        xy = np.asarray(self.coords[:-1] if self.kind == "polyline" else self.coords, float)
        return float(xy[:, 0].mean()), float(xy[:, 1].mean())


@dataclass
class Finding:
    """One finding: coded concept, probability, the threshold and the resulting call."""

    label: str
    code: Code
    probability: float
    threshold: float
    region: Region | None = None
    heatmap: np.ndarray | None = None  # float32 [H, W] in [0, 1], same size as the image

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class Diagnosis:
    """Findings for one image, produced by ``model``."""

    findings: list[Finding]
    model: ModelIdentity
    image_size: tuple[int, int]  # (rows, columns) of the diagnosed image

    def present(self) -> list[Finding]:
        return [f for f in self.findings if f.present]

    def to_dict(self, heatmaps: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": asdict(self.model), "image_size": list(self.image_size), "findings": []}
        for f in self.findings:
            d: dict[str, Any] = {
                "label": f.label,
                "code": asdict(f.code),
                "probability": round(float(f.probability), 6),
                "threshold": float(f.threshold),
                "present": f.present,
                "region": None if f.region is None else {"kind": f.region.kind, "coords": [list(c) for c in f.region.coords]},
            }
            if heatmaps and f.heatmap is not None:
                d["heatmap"] = np.asarray(f.heatmap).tolist()
            out["findings"].append(d)
        return out


# --------------------------------------------------------------------------- protocols
@runtime_checkable
class Conditioner(Protocol):
    """Turns conditions (labels, free text, property targets) into a tensor ``[B, D]``."""

    identity: ModelIdentity
    condition_kinds: frozenset[str]  # subset of {"label", "text", "properties"}
    dim: int

    def encode(self, conditions: Sequence[Any]) -> Any:  # torch.Tensor [B, dim], float32
        ...


@runtime_checkable
class Generator(Protocol):
    """Generates ``n`` synthetic images or molecules, reproducibly from ``seed``."""

    identity: ModelIdentity
    output: Literal["image", "molecule"]
    condition_kinds: frozenset[str]  # {"none", "label", ...}; "none" = unconditional allowed

    def generate(
        self, n: int, condition: Any = None, seed: int = 0, **options: Any
    ) -> list[GeneratedImage] | list[GeneratedMolecule]:
        ...


@runtime_checkable
class Diagnoser(Protocol):
    """Findings for each image, optionally helped by clinical text (one string per image)."""

    identity: ModelIdentity
    input_size: tuple[int, int]  # (rows, columns) the model expects
    findings: tuple[str, ...]  # finding labels it reports, from hygeia.vocab

    def diagnose(self, images: Any, texts: Sequence[str] | None = None) -> list[Diagnosis]:
        ...


def regions_options(diagnoser: Any) -> dict[str, Any]:
    """The ``diagnose()`` keywords that give every present finding's region at the least cost, for
    callers that need the regions but not the heat maps (a DICOM SR, a findings table):
    ``heatmaps="regions"`` where the diagnoser's ``heatmap_modes`` offers it (a remote diagnoser:
    no map travels), else ``heatmaps="present"`` (maps of the present findings only, as ``cxr``
    and ``cnn`` make them), else nothing (the diagnoser's default)."""
    modes = getattr(diagnoser, "heatmap_modes", ())
    for mode in ("regions", "present"):
        if mode in modes:
            return {"heatmaps": mode}
    return {}
