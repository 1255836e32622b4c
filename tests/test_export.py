"""hygeia phantoms export: labelled phantom datasets in the users' layouts, read back with read_labels."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hygeia.data.io import load_image
from hygeia.data.labels import read_labels
from hygeia.errors import InputError
from hygeia_lab import export as export_mod
from hygeia_lab.export import EXPORT_DIFFICULTY, export_phantoms, export_seed, finding_names
from hygeia_lab.phantoms import make_phantom, phantom_labels_text, split_seeds

N, SIZE = 12, 64


def truth(layout: str, split: str = "train", seed: int = 0, n: int = N) -> tuple[np.ndarray, list[str]]:
    """The phantoms' labels in the layout's finding order, and their texts."""
    names = finding_names(layout)
    rows, texts = [], []
    for i in range(n):
        labels, text = phantom_labels_text(export_seed(split, seed, i))
        row = [float(labels[k]) for k in names]
        rows.append(([float(not any(row))] if layout == "chexpert" else []) + row)
        texts.append(text)
    return np.array(rows, np.float32), texts


@pytest.mark.parametrize("layout", ["chexpert", "nih", "datalist"])
def test_export_reads_back_with_ground_truth(tmp_path: Path, layout: str):
    out = tmp_path / layout
    label_file = export_phantoms(out, layout=layout, n=N, size=SIZE, text=True, progress=False)
    t = read_labels(label_file, text_column="Indication")
    y, texts = truth(layout)
    names = list(finding_names(layout).values())
    if layout == "nih":  # the findings are the labels seen
        keep = [j for j in range(len(names)) if y[:, j].any()]
        y, names = y[:, keep], [names[j] for j in keep]
    assert t.findings == (("No Finding",) if layout == "chexpert" else ()) + tuple(names)
    np.testing.assert_array_equal(t.labels, y)
    assert [r.text for r in t] == texts
    assert len(set(t.patients)) == N  # one image per patient
    assert all(c.scheme == "SCT" for c in t.codes())  # every exported name has a code
    prov = json.loads((out / "phantoms.json").read_text())
    assert prov["synthetic"] is True and [im["phantom_seed"] for im in prov["images"]] == \
        [export_seed("train", 0, i) for i in range(N)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_dicom_and_png_pixels_are_the_phantoms(tmp_path: Path):
    p = make_phantom(export_seed("val", 3, 0), size=SIZE, difficulty=EXPORT_DIFFICULTY)
    dcm = read_labels(export_phantoms(tmp_path / "d", "datalist", n=1, size=SIZE, seed=3, split="val",
                                      progress=False), split="validation")
    png = read_labels(export_phantoms(tmp_path / "p", "nih", n=1, size=SIZE, seed=3, split="val",
                                      image_format="png", progress=False))
    im = load_image(dcm[0].image)
    assert im.dataset.Modality == "DX" and "SYNTHETIC" in im.dataset.ImageComments
    np.testing.assert_allclose(im.pixels, p.image, atol=0.5 / 4095 + 1e-6)
    np.testing.assert_allclose(load_image(png[0].image).pixels, p.image, atol=0.5 / 65535 + 1e-6)
    from PIL import Image

    with Image.open(png[0].image) as img:
        assert img.mode.startswith("I;16") and "SYNTHETIC" in img.info["Description"]


def test_nih_boxes_are_the_phantom_regions(tmp_path: Path):
    t = read_labels(export_phantoms(tmp_path / "nih", "nih", n=N, size=SIZE, progress=False),
                    boxes=tmp_path / "nih" / "BBox_List.csv")
    names = finding_names("nih")
    for i, row in enumerate(t):
        p = make_phantom(export_seed("train", 0, i), size=SIZE, difficulty=EXPORT_DIFFICULTY)
        assert sorted(b.finding for b in row.boxes) == sorted(names[k] for k in p.regions)
        for b in row.boxes:
            k = next(k for k, v in names.items() if v == b.finding)
            xs, ys = zip(*p.regions[k].coords)
            assert (b.x, b.y, b.x + b.w, b.y + b.h) == pytest.approx((min(xs), min(ys), max(xs), max(ys)), abs=0.06)
    assert any(r.boxes for r in t)


@pytest.mark.parametrize("syntax, uid, lossy", [
    ("rle", "1.2.840.10008.1.2.5", False),
    ("jpegls", "1.2.840.10008.1.2.4.80", False),
    ("jpeg2000", "1.2.840.10008.1.2.4.90", False),
    ("deflate", "1.2.840.10008.1.2.1.99", False),
    ("jpeg2000-lossy", "1.2.840.10008.1.2.4.91", True),
    ("jpeg-lossless", "1.2.840.10008.1.2.4.70", False),
])
def test_transfer_syntaxes(tmp_path: Path, syntax: str, uid: str, lossy: bool):
    if syntax == "jpeg-lossless" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed")
    t = read_labels(export_phantoms(tmp_path / syntax, "chexpert", n=2, size=SIZE, transfer_syntax=syntax,
                                    progress=False))
    for i, row in enumerate(t):
        im = load_image(row.image)
        assert im.dataset.file_meta.TransferSyntaxUID == uid
        assert im.dataset.LossyImageCompression == ("01" if lossy else "00")
        p = make_phantom(export_seed("train", 0, i), size=SIZE, difficulty=EXPORT_DIFFICULTY)
        if lossy:  # close on average, not pixel for pixel
            assert np.abs(im.pixels - p.image).mean() < 0.03
        else:
            np.testing.assert_allclose(im.pixels, p.image, atol=0.5 / 4095 + 1e-6)


def test_missing_encoder_is_one_clear_line(tmp_path: Path, monkeypatch):
    import pydicom.pixels

    class Missing:
        is_available = False
        missing_dependencies = ("pylibjpeg-rle (pip install pylibjpeg-rle)",)

    monkeypatch.setattr(pydicom.pixels, "get_encoder", lambda uid: Missing())
    monkeypatch.setattr(export_mod.shutil, "which", lambda name: None)
    with pytest.raises(InputError) as e:
        export_phantoms(tmp_path / "x", "nih", n=2, size=SIZE, transfer_syntax="rle", progress=False)
    msg = str(e.value)
    assert "--transfer-syntax" in msg and "pylibjpeg-rle" in msg and "dcmcrle" in msg and "\n" not in msg
    assert not (tmp_path / "x").exists()


def test_splits_and_seeds_never_share_phantoms():
    seeds = {s: {export_seed(s, k, i) for k in (0, 1) for i in range(200)} for s in ("train", "val", "test")}
    assert all(len(v) == 400 for v in seeds.values())
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    assert not seeds["train"] & set(split_seeds(400, "train").tolist())  # nor the lab's training phantoms


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch):
    calls = []

    def boom(seed, **kw):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return make_phantom(seed, **kw)

    monkeypatch.setattr(export_mod, "make_phantom", boom)
    with pytest.raises(KeyboardInterrupt):
        export_phantoms(tmp_path / "out", "chexpert", n=5, size=SIZE, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, needle", [
    ({"layout": "mimic"}, "--layout"),
    ({"n": 0}, "-n"),
    ({"image_format": "jpg"}, "--format"),
    ({"image_format": "png", "transfer_syntax": "rle"}, "explicit with --format png"),
    ({"split": "dev"}, "--split"),
    ({"transfer_syntax": "jpeg-xl"}, "--transfer-syntax"),
])
def test_bad_options(tmp_path: Path, kwargs: dict, needle: str):
    with pytest.raises(InputError, match=needle):
        export_phantoms(tmp_path / "o", **{"layout": "nih", "n": 2, "size": SIZE, "progress": False, **kwargs})


def test_cli_export_and_overwrite(tmp_path: Path):
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "hygeia", "phantoms", "export", "--layout", "nih", "-n", "3", "--size", "32",
            "--out", str(out), "--format", "png"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert (out / "Data_Entry.csv").is_file() and len(list((out / "images").iterdir())) == 3
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)  # out now holds files
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([*args, "--overwrite", "--seed", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "phantoms.json").read_text())["seed"] == 1
