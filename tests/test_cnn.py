"""The shipped ``cnn`` diagnoser: weights, outputs, input checks, held-out skill, heat maps."""
from __future__ import annotations

import numpy as np
import pytest

from hygeia.api import Diagnosis
from hygeia.errors import InputError
from hygeia.vocab import FINDING_LABELS, finding
from hygeia_lab import make_phantom, make_phantom_set
from hygeia_lab.evaluation.diagnosers import evaluate, expected_calibration_error


@pytest.fixture(scope="module")
def cnn():
    from hygeia_cnn.plugin import CnnDiagnoser

    return CnnDiagnoser()  # the shipped bundle (hygeia.create("diagnoser", "cnn") builds the same)


@pytest.fixture(scope="module")
def held_out():
    return make_phantom_set(200, "test", size=64)


def test_shipped_bundle_loads(cnn):
    from hygeia_cnn.plugin import SPEC as spec

    assert spec.kind == "diagnoser" and spec.train is not None and spec.factory is type(cnn)
    assert spec.default is False  # the 64 px phantom model: the generators' judge; cxr is the default
    assert cnn.identity.name == "cnn" and len(cnn.identity.weights_sha256) == 64
    assert len(cnn.thresholds) == 5 and all(0 < t < 1 for t in cnn.thresholds)
    m = spec.model_card.metrics
    assert set(m["test_auroc"]) == set(FINDING_LABELS) and m["n_test"] >= 2000
    from hygeia_cnn.plugin import WEIGHTS

    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) < 10 * 2**20


def test_serving_does_not_import_the_trainer():
    """Registering and building the plugin loads plugin.py and model.py, not train.py (the spec
    names its trainer by string, imported when training starts)."""
    import subprocess
    import sys

    code = ("import sys; from hygeia.plugins import get_registry; r = get_registry(); "
            "r.create('diagnoser', 'cnn', device='cpu'); s = r.find('cnn'); "
            "assert 'hygeia_cnn.train' not in sys.modules, 'trainer imported'; "
            "assert s.trainer().__module__ == 'hygeia_cnn.train'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_outputs(cnn):
    ps = make_phantom_set(3, "val")
    out = cnn.diagnose(ps.images, texts=ps.texts)
    assert len(out) == 3 and all(isinstance(d, Diagnosis) for d in out)
    for d in out:
        assert [f.label for f in d.findings] == list(FINDING_LABELS) and d.image_size == (64, 64)
        for f in d.findings:
            assert 0 <= f.probability <= 1 and f.code == finding(f.label).code
            assert f.heatmap.shape == (64, 64) and f.heatmap.dtype == np.float32
            assert 0 <= f.heatmap.min() and f.heatmap.max() <= 1
    probs = cnn.predict_proba(ps.images)
    assert probs.shape == (3, 5) and np.allclose(probs, [[f.probability for f in d.findings] for d in out], atol=1e-6)


def test_heatmaps_optional_and_texts_ignored(cnn):
    x = make_phantom_set(2, "val").images
    a = cnn.diagnose(x, heatmaps=False)
    b = cnn.diagnose(x, texts=["fever and cough", "routine"], heatmaps=False)
    assert all(f.heatmap is None and f.region is None for d in a for f in d.findings)
    assert [[f.probability for f in d.findings] for d in a] == [[f.probability for f in d.findings] for d in b]


def test_rgb_and_single_image_accepted(cnn):
    img = make_phantom(1).image
    p1 = cnn.diagnose(img, heatmaps=False)[0].findings[0].probability
    rgb = np.repeat(img[None, None], 3, axis=1)
    assert cnn.diagnose(rgb, heatmaps=False)[0].findings[0].probability == pytest.approx(p1, abs=1e-5)


@pytest.mark.parametrize("bad, why", [
    (np.zeros((1, 1, 128, 128), np.float32), "size"),
    (np.zeros((1, 1, 64, 64), np.uint8), "dtype"),
    (np.full((1, 1, 64, 64), np.nan, np.float32), "NaN"),
    (np.zeros((0, 1, 64, 64), np.float32), "empty"),
    ("image.png", "type"),
])
def test_bad_images(cnn, bad, why):
    with pytest.raises(InputError, match="images"):
        cnn.diagnose(bad)
    assert len(cnn.diagnose(np.zeros((1, 1, 64, 64), np.float32), heatmaps=False)) == 1  # still works


def test_bad_texts(cnn):
    with pytest.raises(InputError, match="texts"):
        cnn.diagnose(np.zeros((2, 1, 64, 64), np.float32), texts=["one"])


def test_beats_chance_on_held_out(cnn, held_out):
    res = evaluate(cnn, held_out, localisation=False)
    assert res["n"] == 200 and res["macro_auroc"] > 0.88, res["per_finding"]
    for label, row in res["per_finding"].items():
        if row["n_pos"] >= 10:  # nodules are the weak finding (AUROC ~0.76 on 2000 test phantoms)
            assert row["auroc"] > (0.6 if label == "nodule" else 0.9), (label, row)


def test_youden_threshold_is_the_middle_of_the_gap():
    from hygeia_cnn.train import youden_thresholds

    y = np.array([[0], [0], [1], [1]])
    assert youden_thresholds(y, np.array([[0.1], [0.2], [0.8], [0.9]])) == [pytest.approx(0.5)]  # separable
    y = np.array([[0], [1], [0], [1], [1]])
    assert youden_thresholds(y, np.array([[0.1], [0.3], [0.4], [0.6], [0.9]])) == [pytest.approx(0.5)]


def test_regions_for_present_findings(cnn):
    imgs = np.stack([make_phantom(s, findings=["cardiomegaly"]).image for s in range(4)])[:, None]
    out = cnn.diagnose(imgs)
    present = [f for d in out for f in d.findings if f.present]
    assert present, "no finding called on four enlarged hearts"
    for f in present:
        assert f.region is not None and f.region.kind == "box"
        (x0, y0), (x1, y1) = f.region.coords
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        r, c = np.unravel_index(int(np.argmax(f.heatmap)), f.heatmap.shape)
        assert f.region.contains(c + 0.5, r + 0.5)  # the box holds the hottest pixel
    for d in out:
        assert all(f.region is None for f in d.findings if not f.present)


def test_save_round_trip(cnn, tmp_path):
    from hygeia_cnn.plugin import CnnDiagnoser

    sha = cnn.save(tmp_path / "b")
    assert sha == cnn.identity.weights_sha256
    again = CnnDiagnoser(bundle=tmp_path / "b")
    x = make_phantom_set(2, "val").images
    assert np.allclose(again.predict_proba(x), cnn.predict_proba(x))


def test_ece():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert expected_calibration_error(y, np.array([1.0, 1.0, 0.0, 0.0])) == 1.0


def test_train_is_reproducible(tmp_path):
    """A tiny run twice with one seed gives identical weights (the real run is `hygeia train cnn`)."""
    from hygeia.bundles import load_bundle
    from hygeia_cnn.train import train

    kw = dict(seed=3, progress=False, epochs=1, n_train=64, n_val=32, n_test=32, batch_size=32, threads=1,
              arch={"block_inplanes": [4, 8, 8, 8]})
    a, b = load_bundle(train(out=tmp_path / "a", **kw)), load_bundle(train(out=tmp_path / "b", **kw))
    assert a.sha256 == b.sha256
    assert set(a.card.metrics["test_auroc"]) == set(FINDING_LABELS)
    with pytest.raises(InputError, match="train options"):
        train(out=tmp_path / "c", not_an_option=1)


def test_gradcam_equals_monai(cnn):
    """The one-forward-pass Grad-CAM gives monai's GradCAM maps exactly (it only skips work)."""
    import torch
    from hygeia_cnn.model import _minmax
    from monai.visualize import GradCAM

    x = make_phantom_set(4, split="test", findings=["effusion"]).images
    ref_cam = GradCAM(nn_module=cnn.net, target_layers=cnn.arch["cam_layer"], postprocessing=_minmax)
    ref = np.stack([np.nan_to_num(ref_cam(torch.from_numpy(x), class_idx=k)[:, 0].detach().numpy()).clip(0, 1)
                    for k in range(len(FINDING_LABELS))], 1)
    np.testing.assert_allclose(cnn.gradcam(x), ref, atol=1e-5)
    only = cnn.gradcam(x, classes=[2])
    np.testing.assert_allclose(only[:, 2], ref[:, 2], atol=1e-5)
    assert not only[:, [0, 1, 3, 4]].any()


@pytest.mark.parametrize("stage", ["net.layer1", "net.layer2", "net.layer3", "net.layer4"])
def test_features_and_tail_compute_the_forward_pass(cnn, stage):
    """``CnnNet.features`` gives forward's logits bit for bit and the stage's output (as a hook on it
    sees it); ``tail`` from that output gives the logits again; other layers are refused."""
    import torch

    x = torch.from_numpy(make_phantom_set(3, split="test").images)
    seen = []
    hook = dict(cnn.net.named_modules())[stage].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        want = cnn.net(x)
        hook.remove()
        logits, h = cnn.net.features(x, stage)
        again = cnn.net.tail(h, stage)
    assert torch.equal(logits, want) and torch.equal(h, seen[0]) and torch.equal(again, want)
    with pytest.raises(ValueError, match="cam_layer: expected one of net.layer1"):
        cnn.net.features(x, "net.fc")


def test_maps_do_not_change_the_probabilities(cnn):
    x = make_phantom_set(4, split="test", findings=["cardiomegaly"]).images
    probs = [[f.probability for f in d.findings] for d in cnn.diagnose(x, heatmaps=False)]
    assert probs == [[f.probability for f in d.findings] for d in cnn.diagnose(x, heatmaps=True)]


def test_hirescam_equals_its_definition_on_the_full_graph(cnn):
    """``cam: "hirescam"``: each activation of ``cam_layer`` times its own gradient, summed over
    channels, ReLU, upsampled, min-max; the one-pass maps equal that computed on the whole graph."""
    import torch
    from hygeia_cnn.model import _minmax
    from monai.visualize.visualizer import default_upsampler

    from hygeia_cnn.plugin import CnnDiagnoser

    hires = CnnDiagnoser()
    hires.arch = {**hires.arch, "cam": "hirescam", "cam_layer": "net.layer2"}
    x = make_phantom_set(3, split="test", findings=["consolidation"]).images
    acts: list[torch.Tensor] = []
    hook = dict(hires.net.named_modules())["net.layer2"].register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        logits = hires.net(torch.from_numpy(x).requires_grad_(True))
    finally:
        hook.remove()
    want = []
    for k in range(len(FINDING_LABELS)):
        (g,) = torch.autograd.grad(logits[:, k].sum(), acts[0], retain_graph=True)
        cam = _minmax(default_upsampler(hires.input_size)(torch.relu((g * acts[0]).sum(1, keepdim=True)).detach()))
        want.append(np.nan_to_num(cam[:, 0].numpy()).clip(0, 1))
    got = hires.gradcam(x)
    np.testing.assert_allclose(got, np.stack(want, 1), atol=1e-5)
    assert not np.allclose(got, cnn.gradcam(x), atol=1e-3)  # not Grad-CAM's maps


def test_maps_for_present_findings_only_give_the_same_regions():
    """``heatmaps="present"``: the maps of the findings called present (equal to the full call's),
    None for the others, and the very regions of ``heatmaps=True``; anything else is refused."""
    import hygeia

    cxr = hygeia.create("diagnoser", "cxr", device="cpu")
    x = make_phantom_set(6, "test", size=256, difficulty=2.0, findings=["cardiomegaly"]).images
    x = np.concatenate([x[:3], make_phantom_set(4, "test", size=256, difficulty=2.0, findings=[]).images, x[3:]])
    full, some = cxr.diagnose(x, heatmaps=True), cxr.diagnose(x, heatmaps="present")
    assert any(not d.present() for d in some) and all(d.present() for d in some[:3])  # normals left out of the passes
    n_present = 0
    for df, ds in zip(full, some):
        for ff, fs in zip(df.findings, ds.findings):
            assert (ff.probability, ff.present, ff.region) == (fs.probability, fs.present, fs.region)
            if fs.present:
                n_present += 1
                np.testing.assert_allclose(fs.heatmap, ff.heatmap, atol=1e-6)
            else:
                assert fs.heatmap is None and ff.heatmap is not None
    assert 0 < n_present < 5 * len(x)
    assert "present" in cxr.heatmap_modes
    with pytest.raises(InputError, match="heatmaps: expected None, True, False or 'present', got 'some'"):
        cxr.diagnose(x[:1], heatmaps="some")


def test_unknown_cam_method_is_refused(tmp_path):
    import json
    import shutil

    from hygeia_cnn.plugin import WEIGHTS, CnnDiagnoser

    shutil.copytree(WEIGHTS, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["arch"]["cam"] = "scorecam"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"arch\.cam: expected one of gradcam, hirescam, got 'scorecam'"):
        CnnDiagnoser(bundle=tmp_path / "b")


def test_heatmaps_are_thread_safe(cnn):
    """Threads sharing one diagnoser (the gateway's workers, an in-process server) get the maps of
    their own images (the maps use no hooks on the shared network)."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [make_phantom_set(2, split="test", findings=[f], start=10 * i).images for i, f in enumerate(FINDING_LABELS)]
    serial = [cnn.gradcam(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(cnn.gradcam, xs), serial):
                np.testing.assert_array_equal(got, want)


def test_cxr_is_the_default_diagnoser_at_256_px():
    """The default diagnoser reads 256 px and reports the phantom findings with the vocabulary's codes."""
    import hygeia
    from hygeia.plugins import get_registry
    from hygeia_cnn.plugin import CXR_SPEC, CxrDiagnoser

    assert get_registry().default_name("diagnoser") == "cxr" and CXR_SPEC.default is True
    cxr = hygeia.create("diagnoser", "cxr", device="cpu")
    assert isinstance(cxr, CxrDiagnoser) and cxr.identity.name == "cxr" and cxr.input_size == (256, 256)
    assert set(cxr.findings) == set(FINDING_LABELS)
    assert [t.dims for t in CXR_SPEC.inputs if t.name == "IMAGES"] == [(1, 256, 256)]
    ps = make_phantom_set(4, "test", size=256)
    for d in cxr.diagnose(ps.images):
        assert d.image_size == (256, 256)
        assert all(f.code == finding(f.label).code and f.heatmap.shape == (256, 256) for f in d.findings)
    assert CXR_SPEC.model_card.metrics["val_macro_auroc"] > 0.75


def test_cxr_heatmaps_point_at_the_finding():
    """The default diagnoser's maps (HiResCAM on layer2, from its bundle's config) point inside the
    enlarged heart; Grad-CAM on layer3 of the same network mostly did not (0.15 on 1,000 phantoms)."""
    import hygeia

    cxr = hygeia.create("diagnoser", "cxr", device="cpu")
    assert (cxr.arch["cam"], cxr.arch["cam_layer"]) == ("hirescam", "net.layer2")
    ps = make_phantom_set(16, "test", size=256, difficulty=2.0, findings=["cardiomegaly"])
    shipped = evaluate(cxr, ps)["per_finding"]["cardiomegaly"]
    cxr.arch = {**cxr.arch, "cam": "gradcam", "cam_layer": "net.layer3"}
    before = evaluate(cxr, ps)["per_finding"]["cardiomegaly"]
    assert shipped["localisation_n"] >= 10
    assert shipped["localisation"] >= 0.7 and shipped["localisation"] > before["localisation"] + 0.3


def test_lenient_localisation_tolerance_is_2px_at_128px_scale() -> None:
    from hygeia_lab.evaluation.diagnosers import NEAR_PX, NEAR_SCALE, _near

    for side in (128, 256):
        mask = np.zeros((side, side), bool)
        mask[50, 50] = True
        tol = NEAR_PX * side / NEAR_SCALE
        assert _near(mask, 50, 50 + int(tol), tol)  # at the tolerance: near
        assert not _near(mask, 50, 50 + int(tol) + 1, tol)  # one pixel further: not
    assert NEAR_PX * 256 / NEAR_SCALE == 4  # the "2 px at 128 px, or the equivalent at 256 px"


def test_localisation_interval_and_target_line() -> None:
    """Each finding's lenient hit rate carries its Wilson 95 % interval; the target line names the
    findings short of the per-finding target, with rate, interval and number of calls."""
    from hygeia_lab.evaluation.diagnosers import hit_rate_interval
    from hygeia_lab.evaluation.fusion import localisation_target

    lo, hi = hit_rate_interval(231, 283)
    z, p, n = 1.959964, 231 / 283, 283  # the Wilson score interval written out
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert lo < 0.8 < 0.85 < hi  # 283 calls cannot tell 0.82 from 0.85
    assert hit_rate_interval(169, 169)[1] == pytest.approx(1.0) and hit_rate_interval(169, 169)[0] > 0.97
    row = lambda hits, n: {"localisation_n": n, "localisation_within_2px": hits / n,  # noqa: E731
                           "localisation_within_2px_ci95": hit_rate_interval(hits, n)}
    line = localisation_target({"per_finding": {"nodule": row(231, 283), "effusion": row(250, 250), "cardiomegaly": {}}})
    assert "not met: nodule;" in line and "nodule 0.816 [0.767, 0.857] (283 calls)" in line
    assert "effusion 1.000" in line and "cardiomegaly" not in line
    assert ": met;" in localisation_target({"per_finding": {"effusion": row(250, 250)}})
