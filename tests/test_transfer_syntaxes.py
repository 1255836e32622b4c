"""DICOM transfer syntaxes a PACS sends decode to the right pixels; bad pixel data is one line.

A 12-bit (and, for JPEG baseline, 8-bit) MONOCHROME2 chest-like phantom is written uncompressed
with pydicom, then encoded with pydicom's encoders (JPEG 2000 through pylibjpeg-openjpeg, RLE,
deflate) or dcmtk's command-line tools (JPEG-LS, JPEG lossless/baseline/extended, RLE). Decoded
stored values must equal the phantom exactly for lossless syntaxes and stay within the stated
tolerance for lossy ones. Bad input must raise one InputError line naming the file, with nothing
of pydicom's logged tracebacks reaching any output.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame

from hygeia.data.decode import MAX_SIDE, decode_pixels
from hygeia.data.io import load_dataset, load_image
from hygeia.errors import InputError

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


# --------------------------------------------------------------------------- corrupt streams
def _rewrite_frame(src: Path, dst: Path, change) -> Path:
    ds = pydicom.dcmread(src)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([change(frame)])
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _truncate(frame: bytes) -> bytes:
    return frame[: len(frame) // 2]


def _garble_header(frame: bytes) -> bytes:
    """Marker (FF 4F / FF D8) kept, the next 38 header bytes flipped, the end marker intact."""
    return frame[:2] + bytes(b ^ 0xA5 for b in frame[2:40]) + frame[40:]


@pytest.fixture
def j2k(tmp_path) -> Path:
    raw, _ = write_raw(tmp_path, 12)
    pydicom_encode(raw, tmp_path / "j2k.dcm", uid.JPEG2000Lossless)
    return tmp_path / "j2k.dcm"


@pytest.fixture
def jls(tmp_path) -> Path:
    if not DCMTK:
        pytest.skip("dcmtk not installed")
    raw, _ = write_raw(tmp_path, 12)
    dcmtk("dcmcjpls", "+el")(raw, tmp_path / "jls.dcm")
    return tmp_path / "jls.dcm"


def _one_line_error(path: Path, caplog, capsys) -> str:
    """load_image's InputError, checked to be one line naming the file, with no traceback logged."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InputError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and repr(str(path)) in msg and msg.startswith("invalid DICOM file")
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out and out.err == ""
    return msg


def test_truncated_jpeg2000(j2k, tmp_path, caplog, capsys):
    bad = _rewrite_frame(j2k, tmp_path / "j2k-truncated.dcm", _truncate)
    msg = _one_line_error(bad, caplog, capsys)
    assert "expected a complete JPEG 2000 Image Compression (Lossless Only) codestream, got a truncated " \
           "codestream (" in msg and "no end marker FFD9" in msg


def test_garbled_jpeg2000_header(j2k, tmp_path, caplog, capsys):
    """Every decoder fails; pydicom logs each failure with a traceback: none of it may show."""
    bad = _rewrite_frame(j2k, tmp_path / "j2k-garbled.dcm", _garble_header)
    msg = _one_line_error(bad, caplog, capsys)
    assert "expected pixel data that decodes as JPEG 2000 Image Compression (Lossless Only), " \
           "got decoder errors: pylibjpeg: " in msg


def test_truncated_jpeg_ls(jls, tmp_path, caplog, capsys):
    """libjpeg decodes a truncated JPEG-LS stream silently (made-up rows): the missing EOI refuses it."""
    bad = _rewrite_frame(jls, tmp_path / "jls-truncated.dcm", _truncate)
    msg = _one_line_error(bad, caplog, capsys)
    assert "expected a complete JPEG-LS Lossless Image Compression codestream, got a truncated codestream" in msg


def test_garbled_jpeg_ls_header(jls, tmp_path, caplog, capsys):
    bad = _rewrite_frame(jls, tmp_path / "jls-garbled.dcm", _garble_header)
    msg = _one_line_error(bad, caplog, capsys)
    assert "expected pixel data that decodes as JPEG-LS Lossless Image Compression, got decoder errors: " \
           "pylibjpeg: libjpeg error code" in msg


def test_truncated_rle(tmp_path, caplog, capsys):
    raw, _ = write_raw(tmp_path, 12)
    pydicom_encode(raw, tmp_path / "rle.dcm", uid.RLELossless)
    bad = _rewrite_frame(tmp_path / "rle.dcm", tmp_path / "rle-truncated.dcm", _truncate)
    msg = _one_line_error(bad, caplog, capsys)
    assert "expected pixel data that decodes as RLE Lossless, got decoder errors: " in msg


# --------------------------------------------------------------------------- other bad input
def _float_dataset(kind: str, finite: bool = False) -> Dataset:
    """A Float (32-bit) or Double Float (64-bit) Pixel Data image; unless ``finite``, one NaN and one -Inf."""
    dtype, bits = (np.float32, 32) if kind == "FloatPixelData" else (np.float64, 64)
    ds = dataset(phantom(12), 12)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = bits
    a = phantom(12).astype(dtype) / 4095
    if not finite:
        a[10, 10], a[20, 20] = np.nan, -np.inf
    setattr(ds, kind, a.tobytes())
    return ds


@pytest.mark.parametrize("kind, label", [("FloatPixelData", "Float Pixel Data"),
                                         ("DoubleFloatPixelData", "Double Float Pixel Data")])
def test_float_pixel_data_nan_inf_refused(tmp_path, caplog, capsys, kind, label):
    path = tmp_path / f"{kind}.dcm"
    _float_dataset(kind).save_as(path, enforce_file_format=True)
    msg = _one_line_error(path, caplog, capsys)
    assert msg == f"invalid DICOM file {str(path)!r}: expected finite pixel values, got 1 NaN and 1 infinite " \
                  f"pixel(s) in {label}"
    px = load_dataset(_float_dataset(kind, finite=True)).pixels  # finite float images still load
    assert px.shape == (128, 112) and np.isfinite(px).all() and px.min() == 0.0 and px.max() == 1.0


@pytest.mark.parametrize("rows, cols", [(0, 112), (128, 0)])
def test_zero_rows_or_columns(tmp_path, caplog, capsys, rows, cols):
    ds = dataset(phantom(12), 12)
    ds.Rows, ds.Columns = rows, cols
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    msg = _one_line_error(path, caplog, capsys)
    assert msg.endswith(f": expected Rows and Columns of at least 1 pixel, got {rows} x {cols} (rows x columns)")


def test_huge_dimensions_refused_before_decoding(j2k, tmp_path, caplog, capsys, monkeypatch):
    """Rows above MAX_SIDE: refused from the header alone, no decoder is run."""
    assert MAX_SIDE == 16384
    ds = pydicom.dcmread(j2k)
    ds.Rows = 40000  # the codestream says 128: a decoder would fail differently, or try to allocate
    path = tmp_path / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    calls = []
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: calls.append(1)))
    msg = _one_line_error(path, caplog, capsys)
    assert msg.endswith(": expected at most 16384 pixels a side (refused before decoding), "
                        "got 40000 x 112 (rows x columns)")
    assert calls == []
    ds = dataset(phantom(12), 12)
    ds.Columns = MAX_SIDE + 1
    with pytest.raises(InputError, match="at most 16384 pixels a side"):
        load_dataset(ds)


def test_non_image_sop_class(tmp_path, caplog, capsys):
    ds = dataset(phantom(12), 12)
    for kw in ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation", "PixelSpacing"):
        delattr(ds, kw)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.ComprehensiveSRStorage
    ds.Modality = "SR"
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    msg = _one_line_error(path, caplog, capsys)
    assert msg == (f"invalid DICOM file {str(path)!r}: expected a DICOM image with pixel data, got no Pixel Data "
                   f"(SOP Class Comprehensive SR Storage, {uid.ComprehensiveSRStorage})")


def test_unsupported_transfer_syntax(j2k, tmp_path, caplog, capsys):
    ds = pydicom.dcmread(j2k)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    msg = _one_line_error(path, caplog, capsys)
    assert "expected pixel data in a transfer syntax decoded here: " in msg
    assert msg.endswith("got MPEG2 Main Profile / Main Level")


# --------------------------------------------------------------------------- logging and threads
def test_pydicom_warnings_become_one_log_line(tmp_path, caplog, recwarn):
    """A file pydicom warns about still loads; the warning is one record of hygeia's logger, not a Python warning."""
    ds = dataset(phantom(12), 12)
    ds.PixelData = ds.PixelData + bytes(1000)  # more pixel data than Rows x Columns need
    caplog.set_level(logging.WARNING)
    px = load_dataset(ds).pixels
    assert px.shape == (128, 112)
    assert len(recwarn) == 0
    records = [r for r in caplog.records if r.name == "hygeia.data.decode"]
    assert records and all("\n" not in r.getMessage() for r in records)
    assert "pixel data" in records[0].getMessage().lower()


def test_quiet_decoding_is_per_thread_and_leaves_no_filters(j2k, tmp_path):
    bad = _rewrite_frame(j2k, tmp_path / "bad.dcm", _garble_header)
    errors: list[str] = []
    done: list[tuple[int, int]] = []

    def work(i: int) -> None:
        for _ in range(5):
            try:
                load_image(bad if i % 2 else j2k)
                done.append((i, 1))
            except InputError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 10 and len(done) == 10 and all("decoder errors" in e for e in errors)
    for name in ("pydicom", "pydicom.pixels.decoders.base", "pylibjpeg", "openjpeg"):
        assert logging.getLogger(name).filters == []
    stream = io.StringIO()  # pydicom logging outside a decode still reaches its handlers
    handler = logging.StreamHandler(stream)
    logging.getLogger("pydicom").addHandler(handler)
    try:
        logging.getLogger("pydicom").error("outside a decode")
    finally:
        logging.getLogger("pydicom").removeHandler(handler)
    assert "outside a decode" in stream.getvalue()


# --------------------------------------------------------------------------- the command line
def _hygeia(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("hygeia")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hygeia"]
    return subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_diagnoses_jpeg2000(j2k, tmp_path):
    """`hygeia diagnose --json` on a JPEG 2000 file: the same findings as for the uncompressed original."""
    raw = tmp_path / "raw12.dcm"
    r = _hygeia("diagnose", str(raw), str(j2k), "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert [o["input"] for o in out] == [str(raw), str(j2k)]
    assert out[0]["findings"] and {k: v for k, v in out[0].items() if k != "input"} == \
        {k: v for k, v in out[1].items() if k != "input"}


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["j2k-garbled", "float-nan"])
def test_cli_bad_input_is_one_line(j2k, tmp_path, bad):
    if bad == "j2k-garbled":  # the decoder-error path, where pydicom logs tracebacks
        path = _rewrite_frame(j2k, tmp_path / "j2k-garbled.dcm", _garble_header)
        expected = "expected pixel data that decodes as JPEG 2000 Image Compression (Lossless Only), got decoder"
    else:
        path = tmp_path / "float-nan.dcm"
        _float_dataset("FloatPixelData").save_as(path, enforce_file_format=True)
        expected = "expected finite pixel values, got 1 NaN and 1 infinite pixel(s) in Float Pixel Data"
    r = _hygeia("diagnose", str(path), "--json")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: invalid DICOM file {str(path)!r}: ") and expected in lines[0]
    assert "Traceback" not in r.stderr
