"""DICOM outputs: synthetic Secondary Capture images from a generator, marked as synthetic.

Validated with dciodvfy (dicom3tools; :func:`test_dicom_sr.dciodvfy_errors`) and read back with
pydicom and Hygeia's own loader.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

import hygeia
from hygeia.api import GeneratedImage
from hygeia.data.io import load_image
from hygeia.errors import InputError
from hygeia.plugins import get_registry
from test_dicom_sr import dciodvfy_errors

pytestmark = pytest.mark.skipif(not shutil.which("dciodvfy"), reason="needs dicom3tools (dciodvfy)")


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory) -> Path:
    from hygeia_lab import write_phantom_dicom

    return Path(write_phantom_dicom(tmp_path_factory.mktemp("phantoms") / "p11.dcm", seed=11, finding="effusion"))

def _generated(n: int = 2, seed: int = 5) -> list[GeneratedImage]:
    """Real GeneratedImage results from a registered generator (the procedural phantom one)."""
    return hygeia.create("generator", "phantom").generate(n, condition="effusion", seed=seed)


def test_sc_marked_synthetic_and_valid(tmp_path):
    images = _generated()
    paths = get_registry().output_format("dicom-sc").write(images, tmp_path / "sc", sources=None)
    assert len(paths) == 2
    datasets = [pydicom.dcmread(p) for p in paths]
    for p, ds, img in zip(paths, datasets, images):
        assert dciodvfy_errors(p) == []
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "YES"
        assert "SYNTHETIC" in ds.SeriesDescription and f"{img.model.name} {img.model.version}" in ds.SeriesDescription
        assert f"seed={img.seed}" in ds.ImageComments and "condition=effusion" in ds.ImageComments
        assert img.model.name in ds.ImageComments and ds.PatientName == "SYNTHETIC^HYGEIA"
        assert any(e.PurposeOfReferenceCodeSequence[0].CodeValue == "109100" for e in ds.ContributingEquipmentSequence)
        li = load_image(p)  # generated pixels come back (the banner strip is below them)
        h = img.pixels.shape[1]
        np.testing.assert_allclose(li.pixels[:h], img.pixels[0], atol=2e-5)
        assert li.pixels[h:].max() > 0.9 and li.pixels[h:].min() < 0.01  # burned-in 'SYNTHETIC' banner
        assert li.pixel_spacing == pytest.approx(img.pixel_spacing)
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    again = get_registry().output_format("dicom-sc").write(_generated(), tmp_path / "sc2")
    assert pydicom.dcmread(again[0]).StudyInstanceUID != datasets[0].StudyInstanceUID  # a new study each time


def test_sc_into_source_study(tmp_path, phantom_file):
    src = pydicom.dcmread(phantom_file)
    paths = get_registry().output_format("dicom-sc").write(_generated(1), tmp_path, sources=src)
    ds = pydicom.dcmread(paths[0])
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.ConversionType == "SYN"
    assert dciodvfy_errors(paths[0]) == []


def test_sc_bad_input(tmp_path):
    img = _generated(1)[0]
    img.pixels = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(InputError, match="C = 1 or 3"):
        get_registry().output_format("dicom-sc").write([img], tmp_path)
    with pytest.raises(InputError, match="GeneratedImage"):
        get_registry().output_format("dicom-sc").write(["not an image"], tmp_path)


def test_cli_generate_writes_synthetic_sc(tmp_path):
    from typer.testing import CliRunner

    from hygeia.cli import get_app

    app = get_app()

    r = CliRunner().invoke(app, ["generate", "--plugin", "phantom", "-n", "2", "-c", "nodule", "--seed", "3",
                                 "--out", str(tmp_path / "grid.png"), "--dicom", str(tmp_path / "sc")])
    assert r.exit_code == 0, r.output
    paths = sorted((tmp_path / "sc").glob("*.dcm"))
    assert len(paths) == 2
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.ConversionType == "SYN" and "seed=3" in ds.ImageComments and "condition=nodule" in ds.ImageComments
        assert dciodvfy_errors(p) == []
