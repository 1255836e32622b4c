"""Contract tests every Hygeia plugin must pass, as base classes for plugin authors.

Subclass the class for your plugin's kind and name your plugin (pandas' ``tests/extension/base``
and scikit-learn's ``parametrize_with_checks`` are the model)::

    from hygeia.testing import DiagnoserContract

    class TestMyDiagnoser(DiagnoserContract):
        plugin_name = "my-diagnoser"

Override the ``plugin`` fixture to test an object that is not built from the registry (e.g. a
remote plugin served by Triton); the bundle round trip is then skipped unless the object has
``save``. Every check raises a plain assertion with a message that says what the contract needs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from ..api import (
    Diagnosis,
    GeneratedImage,
    GeneratedMolecule,
    ModelIdentity,
    PluginSpec,
)
from ..errors import InputError, UnsupportedConditionError
from ..plugins import get_registry
from ..vocab import FINDING_LABELS, finding

_DTYPES = {"FP32", "FP16", "INT64", "INT32", "BYTES", "BOOL", "UINT8"}
_EXAMPLES: dict[str, list[Any]] = {
    "label": ["effusion", "normal"],
    "text": ["chest radiograph with a left pleural effusion", "normal chest"],
    "properties": [{"logP": 2.5}, {"QED": 0.7}],
}
_FOREIGN: dict[str, Any] = {  # a condition of each kind, to offer plugins that do not take it
    "label": "cardiomegaly",
    "text": "free text the plugin cannot take",
    "properties": {"logP": 1.0},
    "none": None,
}


class _Contract:
    kind: ClassVar[str]
    plugin_name: ClassVar[str] = ""
    plugin_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def spec(self) -> PluginSpec:
        if not self.plugin_name:
            pytest.fail(f"{type(self).__name__}: set plugin_name to the {self.kind} plugin to check")
        return get_registry().get(self.kind, self.plugin_name)  # type: ignore[arg-type]

    @pytest.fixture
    def plugin(self, spec: PluginSpec) -> Any:
        return spec.factory(**self.plugin_options)

    # -- metadata -----------------------------------------------------------
    def test_metadata_complete(self, spec: PluginSpec) -> None:
        assert spec.kind == self.kind
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", spec.name), f"name {spec.name!r}: lower-case [a-z0-9_-]"
        assert re.match(r"^\d+\.\d+", spec.version), f"version {spec.version!r}: expected MAJOR.MINOR[.PATCH]"
        assert spec.description.strip(), "description must not be empty"
        assert spec.package, "package (distribution) unknown: register through an entry point"
        card = spec.model_card
        for field in ("intended_use", "training_data", "limitations"):
            assert str(getattr(card, field)).strip(), f"model card: {field} must not be empty"
        assert spec.inputs and spec.outputs, "inputs and outputs must be declared (a server needs them)"
        if spec.train is not None:
            assert callable(spec.trainer()), f"train {spec.train!r} does not name a function"
        for t in (*spec.inputs, *spec.outputs):
            assert t.name and t.name == t.name.upper(), f"tensor name {t.name!r}: expected UPPER_CASE"
            assert t.dtype in _DTYPES, f"tensor {t.name}: dtype {t.dtype!r} not in {sorted(_DTYPES)}"
            assert all(isinstance(d, int) and (d > 0 or d == -1) for d in t.dims), f"tensor {t.name}: dims {t.dims}"
        names = [t.name for t in spec.inputs] + [t.name for t in spec.outputs]
        assert len(names) == len(set(names)), f"tensor names must be unique: {names}"
        import json

        json.dumps(spec.metadata())  # JSON-able

    def test_served_tensors(self, plugin: Any, spec: PluginSpec) -> None:
        """The spec declares the tensors :mod:`hygeia.tensors` describes for this plugin's kind and sizes."""
        from ..serving.repository import plan_model

        plan_model(spec, plugin)  # InputError naming the spec's tensors and the expected ones

    def test_identity(self, plugin: Any, spec: PluginSpec) -> None:
        ident = plugin.identity
        assert isinstance(ident, ModelIdentity)
        assert (ident.name, ident.version, ident.kind) == (spec.name, spec.version, spec.kind)
        if ident.weights_sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", ident.weights_sha256), "weights_sha256: 64 hex digits"

    # -- bundle round trip ---------------------------------------------------
    def test_bundle_round_trip(self, plugin: Any, spec: PluginSpec, tmp_path: Path) -> None:
        if not hasattr(plugin, "save"):
            pytest.skip(f"{spec.name}: no weights to save (procedural or remote plugin)")
        plugin.save(tmp_path / "bundle")
        from ..bundles import load_bundle

        b = load_bundle(tmp_path / "bundle")  # safetensors + config + card, no pickle
        assert b.sha256 == plugin.identity.weights_sha256, "saved weights differ from the loaded ones"
        again = spec.factory(bundle=tmp_path / "bundle", **self.plugin_options)
        assert again.identity == plugin.identity
        self.assert_same_outputs(plugin, again)

    # -- frozen serving (optional) -------------------------------------------
    def test_frozen_runner_agrees(self, plugin: Any, spec: PluginSpec, tmp_path: Path) -> None:
        """A plugin that offers ``freeze()`` (:mod:`hygeia.frozen`) gets a runner that loads and
        answers as the plugin does on the probes ``hygeia triton build`` uses."""
        if not callable(getattr(plugin, "freeze", None)):
            pytest.skip(f"{spec.name}: no freeze() (served as the plugin itself)")
        from .. import frozen

        try:
            runner_path = frozen.freeze(plugin, tmp_path / "frozen")
        except ValueError as exc:
            pytest.fail(f"{spec.name}: freeze() or its runner is refused: {exc}")
        runner = frozen.load(tmp_path / "frozen")
        assert runner.identity == plugin.identity, f"runner {runner_path} reports another identity"

    def assert_same_outputs(self, a: Any, b: Any) -> None:  # pragma: no cover - per kind
        raise NotImplementedError


class ConditionerContract(_Contract):
    """Contract for conditioners: ``encode(conditions) -> float32 [B, dim]``."""

    kind = "conditioner"

    def examples(self, plugin: Any) -> list[Any]:
        return [c for k in sorted(plugin.condition_kinds) for c in _EXAMPLES.get(k, [])]

    def test_encode_shape_dtype(self, plugin: Any) -> None:
        conds = self.examples(plugin)
        assert conds, f"condition_kinds {plugin.condition_kinds}: no example conditions known; override examples()"
        z = plugin.encode(conds)
        assert tuple(z.shape) == (len(conds), plugin.dim), f"encode: expected [{len(conds)}, {plugin.dim}], got {tuple(z.shape)}"
        assert str(z.dtype) == "torch.float32"
        assert bool(z.isfinite().all())

    def test_deterministic(self, plugin: Any) -> None:
        conds = self.examples(plugin)
        assert np.array_equal(plugin.encode(conds).cpu().numpy(), plugin.encode(conds).cpu().numpy())

    def test_bad_input(self, plugin: Any) -> None:
        with pytest.raises(InputError):
            plugin.encode([])
        for kind, cond in _FOREIGN.items():
            if kind not in plugin.condition_kinds and cond is not None:
                with pytest.raises(UnsupportedConditionError):
                    plugin.encode([cond])

    def assert_same_outputs(self, a: Any, b: Any) -> None:
        conds = self.examples(a)
        assert np.allclose(a.encode(conds).cpu().numpy(), b.encode(conds).cpu().numpy())


class GeneratorContract(_Contract):
    """Contract for generators: images or molecules, reproducible from a seed."""

    kind = "generator"
    n: ClassVar[int] = 2
    generate_options: ClassVar[dict[str, Any]] = {}

    def condition(self, plugin: Any) -> Any:
        for k in ("label", "text", "properties"):
            if k in plugin.condition_kinds:
                return _EXAMPLES[k][0]
        return None

    def _gen(self, plugin: Any, seed: int = 0) -> list[Any]:
        return plugin.generate(self.n, condition=self.condition(plugin), seed=seed, **self.generate_options)

    def test_output(self, plugin: Any) -> None:
        out = self._gen(plugin)
        assert len(out) == self.n, f"generate(n={self.n}) returned {len(out)} results"
        assert plugin.output in ("image", "molecule")
        for r in out:
            assert r.model == plugin.identity, "each result records the model identity"
            if plugin.output == "image":
                assert isinstance(r, GeneratedImage)
                assert r.synthetic is True, "generated images are always marked synthetic"
                assert r.pixels.dtype == np.float32 and r.pixels.ndim == 3, f"pixels: float32 [C, H, W], got {r.pixels.dtype} {r.pixels.shape}"
                assert np.isfinite(r.pixels).all() and r.pixels.min() >= 0 and r.pixels.max() <= 1, "pixels in [0, 1]"
                assert len(r.pixel_spacing) == 2 and min(r.pixel_spacing) > 0, "pixel_spacing: two positive mm values"
                assert r.modality in ("DX", "CR", "CT", "MR", "OT"), f"modality {r.modality!r}"
            else:
                assert isinstance(r, GeneratedMolecule)
                assert isinstance(r.smiles, str) and isinstance(r.valid, bool)

    def test_progress_reported(self, plugin: Any) -> None:
        import inspect

        if "progress" not in inspect.signature(plugin.generate).parameters:
            pytest.skip("generate() takes no progress callback")
        calls: list[tuple[int, int]] = []
        plugin.generate(self.n, condition=self.condition(plugin), seed=0,
                        progress=lambda done, total: calls.append((done, total)), **self.generate_options)
        assert calls, "progress callback never called"
        assert calls[-1][0] == calls[-1][1], f"progress must end at done == total, ended at {calls[-1]}"
        assert [d for d, _ in calls] == sorted(d for d, _ in calls), "progress must not go backwards"

    def test_same_seed_same_output(self, plugin: Any) -> None:
        self.assert_same_outputs(plugin, plugin)

    def test_different_seed_differs(self, plugin: Any) -> None:
        a, b = self._gen(plugin, seed=1), self._gen(plugin, seed=2)
        assert [_key(x) for x in a] != [_key(x) for x in b], "seeds 1 and 2 gave identical outputs"

    def test_unconditional_or_rejected(self, plugin: Any) -> None:
        if "none" in plugin.condition_kinds:
            assert len(plugin.generate(1, condition=None, seed=0, **self.generate_options)) == 1
        else:
            with pytest.raises(UnsupportedConditionError):
                plugin.generate(1, condition=None, seed=0, **self.generate_options)

    @pytest.mark.parametrize("n", [0, -1, 2.5, "3", True])
    def test_bad_n(self, plugin: Any, n: Any) -> None:
        with pytest.raises(InputError, match="n"):
            plugin.generate(n, condition=self.condition(plugin), seed=0, **self.generate_options)

    def test_unsupported_condition(self, plugin: Any) -> None:
        foreign = [c for k, c in _FOREIGN.items() if k not in plugin.condition_kinds and c is not None]
        foreign.append(12345)  # never a condition
        for cond in foreign:
            with pytest.raises(UnsupportedConditionError):
                plugin.generate(1, condition=cond, seed=0, **self.generate_options)
        if "label" in plugin.condition_kinds and "text" not in plugin.condition_kinds:
            with pytest.raises(InputError, match="condition"):  # an unknown label is not a label
                plugin.generate(1, condition="not-a-finding-label-xyz", seed=0, **self.generate_options)

    def assert_same_outputs(self, a: Any, b: Any) -> None:
        ra, rb = self._gen(a, seed=7), self._gen(b, seed=7)
        assert [_key(x) for x in ra] == [_key(x) for x in rb], "same seed must give the same output"


def _key(r: Any) -> Any:
    if isinstance(r, GeneratedImage):
        return np.asarray(r.pixels).round(5).tobytes()
    return r.smiles


class DiagnoserContract(_Contract):
    """Contract for diagnosers: one coded Diagnosis per image, strict input checks."""

    kind = "diagnoser"
    texts: ClassVar[list[str]] = ["fever and productive cough", "routine pre-operative film"]

    def images(self, plugin: Any, n: int = 2, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        h, w = plugin.input_size
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = 0.3 + 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6)
        return np.stack([base + 0.05 * rng.standard_normal((h, w)) for _ in range(n)]).astype(np.float32)[:, None].clip(0, 1)

    def test_output(self, plugin: Any) -> None:
        imgs = self.images(plugin)
        out = plugin.diagnose(imgs, texts=self.texts)
        assert len(out) == len(imgs) and all(isinstance(d, Diagnosis) for d in out)
        h, w = plugin.input_size
        for d in out:
            assert d.model == plugin.identity
            assert tuple(d.image_size) == (h, w)
            labels = [f.label for f in d.findings]
            assert labels == list(plugin.findings), f"findings {labels} != declared {plugin.findings}"
            for f in d.findings:
                if f.label in FINDING_LABELS:  # a built-in finding keeps the vocabulary's code
                    assert f.code == finding(f.label).code, f"{f.label}: code must come from hygeia.vocab"
                else:  # the user's own finding (a model trained on their labels): a complete code
                    assert f.code.value and f.code.scheme and f.code.meaning, f"{f.label}: incomplete code {f.code}"
                assert 0.0 <= f.probability <= 1.0 and 0.0 <= f.threshold <= 1.0
                assert f.present == (f.probability >= f.threshold)
                if f.heatmap is not None:
                    assert f.heatmap.shape == (h, w) and np.isfinite(f.heatmap).all()
                if f.region is not None:
                    for x, y in f.region.coords:
                        assert 0 <= x <= w and 0 <= y <= h, f"{f.label}: region {f.region} outside the image"

    def test_text_optional(self, plugin: Any) -> None:
        assert len(plugin.diagnose(self.images(plugin), texts=None)) == 2

    def test_deterministic(self, plugin: Any) -> None:
        self.assert_same_outputs(plugin, plugin)

    def test_rgb_accepted(self, plugin: Any) -> None:
        rgb = np.repeat(self.images(plugin, n=1), 3, axis=1)
        assert len(plugin.diagnose(rgb)) == 1

    def test_bad_images(self, plugin: Any) -> None:
        h, w = plugin.input_size
        good = self.images(plugin, n=1)
        bad_inputs = {
            "wrong size": np.zeros((1, 1, h + 3, w), np.float32),
            "integer dtype": (good * 255).astype(np.uint8),
            "NaN pixels": np.where(np.arange(h * w).reshape(1, 1, h, w) == 5, np.nan, good).astype(np.float32),
            "5-D": good[None],
            "empty batch": good[:0],
            "not an array": "image.png",
        }
        for what, arr in bad_inputs.items():
            with pytest.raises(InputError, match="image"):
                plugin.diagnose(arr)
            # ... and the plugin still works afterwards
        assert len(plugin.diagnose(good)) == 1

    def test_bad_texts(self, plugin: Any) -> None:
        with pytest.raises(InputError, match="text"):
            plugin.diagnose(self.images(plugin), texts=["only one for two images"])

    def assert_same_outputs(self, a: Any, b: Any) -> None:
        imgs = self.images(a, seed=3)
        pa = [[f.probability for f in d.findings] for d in a.diagnose(imgs, texts=self.texts)]
        pb = [[f.probability for f in d.findings] for d in b.diagnose(imgs, texts=self.texts)]
        assert np.allclose(pa, pb, atol=1e-5), "same input must give the same probabilities"


CONTRACTS = {"conditioner": ConditionerContract, "generator": GeneratorContract, "diagnoser": DiagnoserContract}
