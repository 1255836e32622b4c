"""Frozen serving: a plugin's inference as saved ONNX graphs plus a runner that needs no torch.

A Triton stub that builds a plugin imports torch and the libraries its networks come from (MONAI,
transformers, diffusers): several CPU seconds per stub, repeated by every stub, and most of a
server's cold start. A plugin can instead *freeze* itself when ``hygeia triton build`` writes its
model: it saves what inference needs (ONNX graphs with the weights in them, tokenizer, thresholds,
codes) into a folder and names a *runner* class, importable without torch, that loads the folder
and answers the same calls as the plugin (``diagnose`` for a diagnoser). The stub then constructs
the runner instead of the plugin.

The protocol, on the plugin instance (optional; without it the plugin is served as it is):

- ``freeze(folder: pathlib.Path) -> str``: write the files into ``folder`` (empty, created) and
  return the runner as ``"module:Class"``. ``Class(folder)`` must not import torch and must offer
  what the plugin offers to the server: ``identity``, ``diagnose(images, texts, heatmaps)``,
  ``findings``, ``input_size`` and ``heatmap_modes`` where the plugin has them (a diagnoser), or
  ``encode(conditions)`` and ``condition_kinds`` (a conditioner), ``generate(n, condition, seed,
  progress, **options)``, ``output``, ``condition_kinds`` and ``max_n`` (a generator). A
  generator's runner draws the plugin's noise without torch with :class:`hygeia.noise.TorchGenerator`.

:func:`freeze` calls it, records the runner and the plugin's identity in ``frozen.json`` and
then checks the runner against the plugin (:func:`check_diagnoser`: probabilities and heat maps
within :data:`TOLERANCE`, the same findings present, the same regions; :func:`check_conditioner`:
the vectors of probe conditions within :data:`TOLERANCE`; :func:`check_generator`: the outputs
of probe calls, images within :data:`IMAGE_TOLERANCE`, molecules identical); a runner that
disagrees is discarded and the model is served by the plugin, with the reason logged in one line.
:func:`load` constructs the runner from a frozen folder. :class:`OnnxGraph` (a saved graph, torch
free) and :func:`export_onnx` (torch, build time only) are the two halves a runner is made of.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, InputError

log = logging.getLogger(__name__)

MANIFEST = "frozen.json"
TOLERANCE = 1e-4
"""Largest accepted |runner - plugin| on a probability or heat-map pixel."""
IMAGE_TOLERANCE = 2e-3
"""Largest accepted |runner - plugin| on a generated pixel in [0, 1] (a sampler's steps add up the
graphs' float rounding; measured on the shipped generators: at most 2e-4)."""
THREADS_ENV = "HYGEIA_COMPILED_THREADS"


def threads() -> int:
    """ONNX Runtime intra-op threads: ``HYGEIA_COMPILED_THREADS``, else ``OMP_NUM_THREADS`` (1 in a
    CPU stub), else every core."""
    for key in (THREADS_ENV, "OMP_NUM_THREADS"):
        v = os.environ.get(key, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


class OnnxGraph:
    """A saved ONNX graph on ONNX Runtime's CPU provider; ``graph(name=array, ...)`` returns its
    outputs in order (``graph.run(["name"], name=array)``: only those). Inputs the exporter dropped
    (unused by the graph) are ignored."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads(), 1
        opts.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a missing or damaged file: one line naming it
            raise BundleError(f"frozen graph {path}: cannot be loaded ({' '.join(str(exc).split())[:200]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **arrays: np.ndarray) -> list[np.ndarray]:
        return self.run(None, **arrays)

    def run(self, outputs: Sequence[str] | None, **arrays: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None if outputs is None else list(outputs),
                                     {k: v for k, v in arrays.items() if k in self.inputs}))


def export_onnx(module: Any, args: tuple[Any, ...], path: str | os.PathLike[str], inputs: Sequence[str],
                outputs: Sequence[str], dynamic: dict[str, dict[int, str]]) -> None:
    """Save ``module`` called with ``args`` (tensors) as an ONNX graph (opset 17) at ``path``;
    ``dynamic``: per input or output name, its axes that vary (name -> {axis: label})."""
    import warnings

    import torch

    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic, opset_version=17)


def freeze(plugin: Any, folder: str | os.PathLike[str]) -> str:
    """Freeze ``plugin`` into ``folder`` (written atomically) and return its runner's import path.

    Raises ``ValueError`` (one line) when the plugin cannot be frozen or its runner disagrees with it.
    """
    from .outputs import atomic_dir

    fn = getattr(plugin, "freeze", None)
    if not callable(fn):
        raise ValueError("the plugin has no freeze() method")
    ident = plugin.identity
    with atomic_dir(folder) as tmp:
        try:
            runner = str(fn(tmp))
        except Exception as exc:  # noqa: BLE001 - any failure means: serve the plugin itself
            raise ValueError(f"freeze() failed: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:300]}") from None
        (tmp / MANIFEST).write_text(json.dumps({
            "runner": runner, "identity": {"name": ident.name, "version": ident.version, "kind": ident.kind,
                                           "weights_sha256": ident.weights_sha256}}, indent=1))
        try:
            check = CHECKS.get(ident.kind)
            if check is None:
                raise ValueError(f"no check for plugin kind {ident.kind!r} (expected one of {', '.join(CHECKS)})")
            check(plugin, load(tmp))
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a runner that fails on the probes is not served
            raise ValueError(f"the runner fails: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:300]}") from None
    return runner


def load(folder: str | os.PathLike[str]) -> Any:
    """The runner of a frozen folder (``BundleError`` naming the folder when it cannot be loaded)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        module, _, cls = str(manifest["runner"]).partition(":")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"frozen model {folder}: no readable {MANIFEST} ({type(exc).__name__})") from None
    try:
        factory = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"frozen model {folder}: runner {manifest['runner']!r} not found ({exc})") from None
    return factory(folder)


def manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A frozen folder's ``frozen.json`` (its runner and the plugin's identity; None if unreadable)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("identity"), dict) else None
    except (OSError, ValueError):
        return None


def model_identity(folder: str | os.PathLike[str]) -> Any:
    """The :class:`~hygeia.api.ModelIdentity` a frozen folder records (what its runner reports)."""
    from .api import ModelIdentity

    data = manifest(folder)
    if data is None:
        raise BundleError(f"frozen model {folder}: no readable {MANIFEST}")
    i = data["identity"]
    return ModelIdentity(i["name"], i["version"], i["kind"], i["weights_sha256"])


def probe_inputs(size: Sequence[int], channels: int = 1, n: int = 6, seed: int = 0) -> np.ndarray:
    """Test images for :func:`check_diagnoser`: smooth random fields in [0, 1] (not constant, so
    maps have a peak)."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in size)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, channels, h, w), np.float32)
    for i in range(n):
        a, b, c = rng.uniform(-3, 3, 3)
        out[i] = (0.5 + 0.25 * np.sin(a * 6 * xx + b * 6 * yy + c) + 0.05 * rng.standard_normal((h, w))).clip(0, 1)
    return out


PROBE_TEXTS = ("ex-smoker with weight loss, known malignancy", "",
               "fever and productive cough for three days, CRP 120, SpO2 91%",
               "post-procedure: central line placed, sudden dyspnoea and pleuritic pain",
               "heart failure, ankle oedema, dull left base", "routine pre-operative film")


def check_diagnoser(plugin: Any, runner: Any, images: np.ndarray | None = None) -> None:
    """``ValueError`` (one line) unless ``runner`` gives ``plugin``'s diagnoses on probe images, with
    and without texts: probabilities and heat maps within :data:`TOLERANCE`, the same findings
    present and the same regions (points within half a pixel)."""
    if tuple(getattr(runner, "findings", ())) != tuple(getattr(plugin, "findings", ())):
        raise ValueError("the runner reports other findings than the plugin")
    x = probe_inputs(plugin.input_size) if images is None else images
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(len(x))]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a plugin's notes on its inputs: the build log stays quiet
        for tx in (None, texts):
            want, got = plugin.diagnose(x, tx), runner.diagnose(x, tx)
            for b, (dw, dg) in enumerate(zip(want, got, strict=True)):
                for fw, fg in zip(dw.findings, dg.findings, strict=True):
                    _same_finding(fw, fg, f"image {b}{' with text' if tx else ''}, {fw.label}")


def _same_finding(fw: Any, fg: Any, where: str) -> None:
    if fw.label != fg.label or abs(fw.probability - fg.probability) > TOLERANCE or fw.present != fg.present:
        raise ValueError(f"{where}: runner {fg.probability:.6f} present={fg.present}, plugin "
                         f"{fw.probability:.6f} present={fw.present}")
    if (fw.heatmap is None) != (fg.heatmap is None) or (
            fw.heatmap is not None and float(np.abs(np.asarray(fw.heatmap) - np.asarray(fg.heatmap)).max()) > TOLERANCE):
        raise ValueError(f"{where}: the heat maps differ")
    rw, rg = fw.region, fg.region
    if (rw is None) != (rg is None) or (rw is not None and (rw.kind != rg.kind or len(rw.coords) != len(rg.coords) or
                                                           float(np.abs(np.subtract(rw.coords, rg.coords)).max()) > 0.5)):
        raise ValueError(f"{where}: the regions differ ({rg} against {rw})")


PROBE_CONDITIONS: dict[str, list[Any]] = {
    "label": ["normal", "nodule", "effusion", "pneumothorax", "cardiomegaly", "consolidation"],
    "text": ["left pleural effusion", "", "small rounded opacity in the right upper lobe", "   "],
    "properties": [{"logP": 2.5}, {"QED": 0.9, "MW": 300}, {}, {"logP": -1.0, "QED": 0.5, "SA": 3.0, "MW": 250}],
}
"""Conditions :func:`check_conditioner` encodes with the plugin and its runner, per condition kind."""


def check_conditioner(plugin: Any, runner: Any) -> None:
    """``ValueError`` (one line) unless ``runner.encode`` gives ``plugin.encode``'s vectors (within
    :data:`TOLERANCE`) on the probe conditions of every kind the plugin takes."""
    for kind in sorted(getattr(plugin, "condition_kinds", ())):
        conds = PROBE_CONDITIONS.get(kind)
        if not conds:
            continue
        want, got = plugin.encode(conds), runner.encode(conds)
        want = want.detach().float().cpu().numpy() if hasattr(want, "detach") else np.asarray(want)
        got = np.asarray(got)
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if not diff <= TOLERANCE:
            raise ValueError(f"{kind} conditions: the runner's vectors differ from the plugin's by {diff:.2e}")


PROBE_GENERATE: dict[str, list[Any]] = {"none": [None], "label": ["effusion", "normal"],
                                        "text": ["large left pleural effusion"], "properties": [{"logP": 2.5}]}
"""Conditions :func:`check_generator` samples with the plugin and its runner, per condition kind."""


def check_generator(plugin: Any, runner: Any) -> None:
    """``ValueError`` (one line) unless ``runner.generate`` gives ``plugin.generate``'s outputs for
    the probe conditions of every kind the plugin takes, with the bundle's sampling defaults and
    with each option set of ``plugin.freeze_probes`` (a list of ``generate`` keyword sets, when
    the plugin has one): pixels within :data:`IMAGE_TOLERANCE`, molecules identical, the same
    condition, seed and provenance; a probe the plugin refuses (``InputError``, e.g. a text
    negative condition for a bundle without a text conditioner) must be refused with the same
    message."""
    for attr in ("output", "condition_kinds", "max_n"):
        if getattr(runner, attr, None) != getattr(plugin, attr, None):
            raise ValueError(f"the runner's {attr} differs from the plugin's")
    probes = [{}, *getattr(plugin, "freeze_probes", [])]
    for kind in sorted(plugin.condition_kinds):
        for cond in PROBE_GENERATE.get(kind, []):
            for options in probes:
                where = f"condition {cond!r}, options {options}"
                try:
                    want = plugin.generate(2, condition=cond, seed=11, **options)
                except InputError as exc:  # a probe this plugin does not take: the runner must refuse it alike
                    _same_refusal(runner, cond, options, exc, where)
                    continue
                got = runner.generate(2, condition=cond, seed=11, **options)
                for w, g in zip(want, got, strict=True):
                    _same_generated(w, g, where)


def _same_refusal(runner: Any, cond: Any, options: dict[str, Any], theirs: Exception, where: str) -> None:
    try:
        runner.generate(2, condition=cond, seed=11, **options)
    except InputError as ours:
        if str(ours) != str(theirs):
            raise ValueError(f"{where}: the runner refuses with {ours}, the plugin with {theirs}") from None
        return
    raise ValueError(f"{where}: the plugin refuses ({theirs}), the runner does not")


def _same_generated(w: Any, g: Any, where: str) -> None:
    def meta(item: Any) -> tuple[Any, ...]:
        prov = {k: v for k, v in getattr(item, "provenance", {}).items() if k != "device"}
        return item.condition, item.seed, prov, getattr(item, "valid", None)

    if meta(w) != meta(g):
        raise ValueError(f"{where}: the runner's condition, seed or provenance differs from the plugin's")
    if hasattr(w, "pixels"):
        diff = float(np.abs(np.asarray(g.pixels) - np.asarray(w.pixels)).max()) \
            if np.shape(g.pixels) == np.shape(w.pixels) else float("inf")
        if not diff <= IMAGE_TOLERANCE:
            raise ValueError(f"{where}: the runner's pixels differ from the plugin's by {diff:.2e}")
    elif getattr(w, "smiles", None) != getattr(g, "smiles", None):
        raise ValueError(f"{where}: the runner sampled {g.smiles!r}, the plugin {w.smiles!r}")


CHECKS = {"diagnoser": check_diagnoser, "conditioner": check_conditioner, "generator": check_generator}
"""The check :func:`freeze` runs per plugin kind."""
