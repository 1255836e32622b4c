"""Bad DICOM pixel data is one line: corrupt JPEG 2000, JPEG-LS and RLE streams, NaN and
infinite float pixels, empty or huge frames, non-image objects, unsupported transfer syntaxes.

Each must raise one InputError line naming the file, with nothing of pydicom's logged tracebacks
reaching any output; the phantom files come from ``test_transfer_syntaxes``.
"""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame

from hygeia.data.decode import MAX_SIDE
from hygeia.data.io import load_dataset, load_image
from hygeia.errors import InputError
from test_transfer_syntaxes import DCMTK, dataset, dcmtk, phantom, pydicom_encode, write_raw


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
