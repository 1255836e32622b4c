"""DICOM transfer syntaxes a PACS sends decode to the right pixels; bad pixel data is one line.

A 12-bit (and, for JPEG baseline, 8-bit) MONOCHROME2 chest-like phantom is written uncompressed
with pydicom, then encoded with pydicom's encoders (JPEG 2000 through pylibjpeg-openjpeg, RLE,
deflate) or dcmtk's command-line tools (JPEG-LS, JPEG lossless/baseline/extended, RLE). Decoded
stored values must equal the phantom exactly for lossless syntaxes and stay within the stated
tolerance for lossy ones. Bad input must raise one InputError line naming the file, with nothing
of pydicom's logged tracebacks reaching any output.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from hygeia.data.decode import decode_pixels
from hygeia.data.io import load_image

DCMTK = all(shutil.which(t) for t in ("dcmcjpls", "dcmcrle", "dcmcjpeg", "dcmconv"))
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="dcmtk's dcmcjpls/dcmcrle/dcmcjpeg/dcmconv not on PATH "
                                 "(apt-get install dcmtk)")


# --------------------------------------------------------------------------- phantom files
def phantom(bits: int = 12, rows: int = 128, cols: int = 112) -> np.ndarray:
    """A chest-like image: body ellipse, two darker lungs, a round nodule, a gentle ramp."""
    y, x = np.mgrid[:rows, :cols].astype(np.float64)
    cy, cx = rows / 2, cols / 2

    def blob(ry: float, rx: float, sx: float, sharp: float) -> np.ndarray:
        return 1 / (1 + np.exp((((y - cy) / ry) ** 2 + ((x - sx) / rx) ** 2 - 1) * sharp))

    body = blob(0.45 * rows, 0.45 * cols, cx, 12)
    lungs = blob(0.3 * rows, 0.14 * cols, cx - 0.2 * cols, 8) + blob(0.3 * rows, 0.14 * cols, cx + 0.2 * cols, 8)
    nodule = np.exp(-((y - 0.4 * rows) ** 2 + (x - 0.35 * cols) ** 2) / 18)
    v = 0.05 + 0.75 * body - 0.5 * lungs + 0.3 * nodule + 0.02 * x / cols
    top = 2**bits - 1
    return np.clip(np.round(v * top), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def dataset(arr: np.ndarray, bits: int) -> Dataset:
    """An uncompressed Secondary Capture MONOCHROME2 dataset holding ``arr``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid.generate_uid(), uid.generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "OT", "PHANTOM", "Phantom^Chest"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits <= 8 else 16), bits, bits - 1, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = arr.tobytes()
    return ds


def write_raw(folder: Path, bits: int) -> tuple[Path, np.ndarray]:
    arr = phantom(bits)
    path = folder / f"raw{bits}.dcm"
    dataset(arr, bits).save_as(path, enforce_file_format=True)
    return path, arr


def pydicom_encode(src: Path, dst: Path, syntax: str, **kw: object) -> None:
    ds = pydicom.dcmread(src)
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, **kw)
    ds.save_as(dst, enforce_file_format=True)


def dcmtk(tool: str, *flags: str):
    def encode(src: Path, dst: Path) -> None:
        r = subprocess.run([tool, *flags, str(src), str(dst)], check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    return encode


# id, bits, encoder, transfer syntax written, largest |error| allowed, largest RMS error allowed
# (errors in stored values; lossless syntaxes: 0 and 0, exact equality)
CASES = [
    ("explicit-vr", 12, None, uid.ExplicitVRLittleEndian, 0, 0),
    pytest.param("implicit-vr", 12, dcmtk("dcmconv", "+ti"), uid.ImplicitVRLittleEndian, 0, 0, marks=needs_dcmtk),
    pytest.param("big-endian", 12, dcmtk("dcmconv", "+tb"), uid.ExplicitVRBigEndian, 0, 0, marks=needs_dcmtk),
    ("deflate", 12, lambda s, d: pydicom_encode(s, d, uid.DeflatedExplicitVRLittleEndian),
     uid.DeflatedExplicitVRLittleEndian, 0, 0),
    ("j2k-lossless", 12, lambda s, d: pydicom_encode(s, d, uid.JPEG2000Lossless), uid.JPEG2000Lossless, 0, 0),
    # JPEG 2000 irreversible at 10:1: at most 16 of 4096 grey levels off, RMS <= 4
    ("j2k-lossy-cr10", 12, lambda s, d: pydicom_encode(s, d, uid.JPEG2000, j2k_cr=[10]), uid.JPEG2000, 16, 4),
    ("rle-pydicom", 12, lambda s, d: pydicom_encode(s, d, uid.RLELossless), uid.RLELossless, 0, 0),
    pytest.param("rle-dcmcrle", 12, dcmtk("dcmcrle"), uid.RLELossless, 0, 0, marks=needs_dcmtk),
    pytest.param("jls-lossless", 12, dcmtk("dcmcjpls", "+el"), uid.JPEGLSLossless, 0, 0, marks=needs_dcmtk),
    # JPEG-LS near-lossless guarantees |error| <= NEAR for every pixel: NEAR = 2 here
    pytest.param("jls-near2", 12, dcmtk("dcmcjpls", "+en", "+md", "2"), uid.JPEGLSNearLossless, 2, 2,
                 marks=needs_dcmtk),
    pytest.param("jpeg-lossless-sv1", 12, dcmtk("dcmcjpeg", "+e1"), uid.JPEGLosslessSV1, 0, 0, marks=needs_dcmtk),
    pytest.param("jpeg-lossless-p14", 12, dcmtk("dcmcjpeg", "+el"), uid.JPEGLossless, 0, 0, marks=needs_dcmtk),
    # JPEG baseline (8-bit only) and extended (12-bit) at dcmcjpeg's default quality 90; +sr keeps the stored
    # values (by default dcmcjpeg rescales lossy monochrome images to their own min..max)
    pytest.param("jpeg-baseline", 8, dcmtk("dcmcjpeg", "+eb", "+sr"), uid.JPEGBaseline8Bit, 8, 2, marks=needs_dcmtk),
    pytest.param("jpeg-extended", 12, dcmtk("dcmcjpeg", "+ee", "+sr"), uid.JPEGExtended12Bit, 24, 4, marks=needs_dcmtk),
]


@pytest.mark.parametrize("case, bits, encode, syntax, max_err, max_rms", CASES)
def test_transfer_syntax_decodes(tmp_path, case, bits, encode, syntax, max_err, max_rms):
    raw, arr = write_raw(tmp_path, bits)
    path = raw if encode is None else tmp_path / f"{case}.dcm"
    if encode is not None:
        encode(raw, path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    stored = decode_pixels(ds, case)
    assert stored.shape == arr.shape
    err = stored.astype(np.int64) - arr.astype(np.int64)
    rms = float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))
    if max_err == 0:
        np.testing.assert_array_equal(stored, arr)
    else:
        assert 0 < np.abs(err).max() <= max_err and rms <= max_rms, (np.abs(err).max(), rms)
    li = load_image(path)
    ref = load_image(raw)
    assert li.pixels.dtype == np.float32 and li.pixels.shape == arr.shape
    assert li.pixel_spacing == (0.5, 0.5) and li.dataset.SOPInstanceUID == ds.SOPInstanceUID
    if max_err == 0:
        np.testing.assert_array_equal(li.pixels, ref.pixels)  # same [0, 1] image, bit for bit
    else:
        # min-max scaled: the stored-value tolerance over the image's range, plus the shifted min/max
        assert np.abs(li.pixels - ref.pixels).max() <= 3 * max_err / float(arr.max() - arr.min())


def _colour_dataset() -> tuple[Dataset, np.ndarray]:
    """An 8-bit RGB image (PlanarConfiguration 0) and its ITU-R 601 luminance in [0, 1]."""
    y, x = np.mgrid[:64, :64]
    rgb = np.stack([np.full((64, 64), 200), (x * 3) % 256, (y * 2 + 40) % 256], axis=-1).astype(np.uint8)
    ds = dataset(phantom(8)[:64, :64], 8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    lum = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    return ds, lum


def _ybr_full(src: Path, dst: Path) -> None:
    from pydicom.pixels import convert_color_space

    ds = pydicom.dcmread(src)
    ds.PixelData = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.save_as(dst, enforce_file_format=True)


def _j2k_rct(src: Path, dst: Path) -> None:
    """JPEG 2000 lossless with the reversible colour transform (pydicom applies it for YBR_RCT)."""
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "YBR_RCT"
    ds.compress(uid.JPEG2000Lossless, use_mct=True)
    ds.save_as(dst, enforce_file_format=True)


@pytest.mark.parametrize("case, encode, photometric, tol", [
    ("ybr-full-native", _ybr_full, "YBR_FULL", 0.01),
    ("j2k-lossless-rct", _j2k_rct, "YBR_RCT", 1e-6),
    ("rle-rgb", lambda s, d: pydicom_encode(s, d, uid.RLELossless), "RGB", 1e-6),
    pytest.param("jpeg-baseline-ybr422", dcmtk("dcmcjpeg", "+eb"), "YBR_FULL_422", 0.02, marks=needs_dcmtk),
])
def test_colour_becomes_luminance_once(tmp_path, case, encode, photometric, tol):
    """Colour is converted to RGB once (by pydicom or the codec), then to luminance: no second YBR->RGB."""
    ds, lum = _colour_dataset()
    raw = tmp_path / "rgb.dcm"
    ds.save_as(raw, enforce_file_format=True)
    encode(raw, tmp_path / f"{case}.dcm")
    li = load_image(tmp_path / f"{case}.dcm")
    assert li.dataset.PhotometricInterpretation == photometric
    assert np.abs(li.pixels - lum).max() <= tol


def test_htj2k_decoder_is_installed():
    """HTJ2K (PS3.5 2023) has a decoder here (pylibjpeg-openjpeg); no encoder here makes a file to test."""
    from pydicom.pixels import get_decoder

    for syntax in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K):
        assert get_decoder(syntax).is_available
