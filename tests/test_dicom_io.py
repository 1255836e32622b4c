"""hygeia.data.io: reading PNG/JPEG/DICOM/npy into [0, 1] intensities, and prepare_image."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from hygeia.data.io import load_dataset, load_image, load_series, prepare_image
from hygeia.errors import InputError


def test_png_8_and_16_bit(tmp_path):
    a = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) % 256).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    li = load_image(tmp_path / "a.png")
    assert li.pixels.dtype == np.float32 and li.pixels.shape == (32, 64)
    np.testing.assert_allclose(li.pixels, a / 255.0, atol=1e-6)
    assert li.dataset is None and li.pixel_spacing is None and li.path == tmp_path / "a.png"
    b = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(b).save(tmp_path / "b.png")
    np.testing.assert_allclose(load_image(tmp_path / "b.png").pixels, b / 65535.0, atol=1e-6)


def test_jpeg_rgb_becomes_gray(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    px = load_image(tmp_path / "c.jpg").pixels
    assert px.shape == (16, 16)
    assert abs(float(px.mean()) - 0.299 * 200 / 255) < 0.03  # ITU-R 601 luminance of pure red


def test_npy_npz(tmp_path):
    a = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(load_image(tmp_path / "a.npy").pixels, a)
    np.savez(tmp_path / "a.npz", image=a[None] * 1000.0)  # out of [0, 1]: min-max scaled
    px = load_image(tmp_path / "a.npz").pixels
    assert px.shape == (20, 30) and px.min() == 0.0 and px.max() == 1.0
    np.save(tmp_path / "vol.npy", np.zeros((4, 8, 8)))
    with pytest.raises(InputError, match="2D array"):
        load_image(tmp_path / "vol.npy")


def test_dicom_rescale_and_spacing():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    li = load_image(path)
    assert li.pixels.shape == (ds.Rows, ds.Columns) and li.pixels.dtype == np.float32
    assert li.pixels.min() == 0.0 and li.pixels.max() == 1.0  # no VOI in the file: min-max of HU
    assert li.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert li.dataset.SOPInstanceUID == ds.SOPInstanceUID
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    np.testing.assert_allclose(li.pixels, expected, atol=1e-6)


def test_dicom_window_is_applied():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window in HU
    px = load_dataset(ds).pixels
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.all(px[hu <= 40 - 200] == 0.0) and np.all(px[hu >= 40 + 200] == 1.0)
    inside = (hu > -150) & (hu < 230)
    np.testing.assert_allclose(px[inside], (hu[inside] - (40 - 200)) / 400, atol=0.01)


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mono2 = load_dataset(ds).pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(load_dataset(ds).pixels, 1.0 - mono2, atol=1e-6)


def test_dicom_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.dcm")
    (tmp_path / "notes.dcm").write_bytes(b"this is not DICOM at all" * 20)
    with pytest.raises(InputError, match="notes.dcm"):
        load_image(tmp_path / "notes.dcm")
    with pytest.raises(InputError, match="no Pixel Data"):
        load_image(get_testdata_file("test-SR.dcm"))
    with pytest.raises(InputError, match="one frame"):
        load_image(get_testdata_file("rtdose.dcm"))  # 15-frame dose volume
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_prepare_image_area_and_bilinear():
    a = np.zeros((128, 128), np.float32)
    a[:, 64:] = 1.0
    out = prepare_image(a, size=(64, 64))
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :32], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, :, 32:], 1.0, atol=1e-6)
    checker = np.indices((128, 128)).sum(0) % 2  # area averaging: a 2x2 checkerboard block -> 0.5
    np.testing.assert_allclose(prepare_image(checker.astype(np.float32))[0], 0.5, atol=1e-6)
    up = prepare_image(np.eye(8, dtype=np.float32), size=(32, 32))
    assert up.shape == (1, 32, 32) and 0.0 <= up.min() and up.max() <= 1.0
    with pytest.raises(InputError, match="2D array"):
        prepare_image(np.zeros((2, 3, 8, 8)))


def test_load_series_orders_instances_and_skips_non_dicom(tmp_path):
    from hygeia_lab import write_phantom_study

    paths = write_phantom_study(tmp_path / "study", n=3, seed=4)
    (tmp_path / "study" / "README.txt").write_text("not an image")
    series = load_series(tmp_path)
    assert [li.dataset.InstanceNumber for li in series] == sorted(pydicom.dcmread(p).InstanceNumber for p in paths)
    assert all(li.pixels.ndim == 2 and li.pixel_spacing is not None for li in series)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="at least one DICOM image"):
        load_series(tmp_path / "empty")
