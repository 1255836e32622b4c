"""Decode the pixel data of one DICOM image, or refuse it with one line.

pydicom's pixel decoders do the work; the pylibjpeg plugins (``pylibjpeg-libjpeg`` for JPEG and
JPEG-LS, ``pylibjpeg-openjpeg`` for JPEG 2000, ``pylibjpeg-rle`` for RLE) give them the
compressed transfer syntaxes. Around them this module

* checks the image geometry before anything is decoded (at least 1 and at most
  :data:`MAX_SIDE` pixels a side),
* checks that a JPEG, JPEG-LS or JPEG 2000 codestream ends with its end marker (FFD9):
  libjpeg decodes a truncated JPEG or JPEG-LS stream without complaint, filling the missing
  rows with made-up values,
* keeps what pydicom and the plugins log and warn while decoding (pydicom logs every failed
  decoder with a traceback) and turns a failure into one :class:`~hygeia.errors.InputError`
  line; on success the warnings are handed on as one-line records of this module's logger,
* refuses Float / Double Float Pixel Data holding NaN or infinity.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import InputError

MAX_SIDE = 16384
"""Largest Rows or Columns accepted; checked before decoding (16384 x 16384 x 2 bytes = 512 MiB)."""

SUPPORTED = ("uncompressed (implicit/explicit VR, little or big endian), deflated explicit VR, RLE lossless, "
             "JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 or HTJ2K")

log = logging.getLogger(__name__)

# Loggers of pydicom and of the pixel plugins; any existing logger below these names is covered too.
_QUIET_ROOTS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "gdcm")
_KNOWN = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils", "pylibjpeg", "pylibjpeg.utils",
          "openjpeg", "libjpeg", "rle")
_LOCK = threading.RLock()  # warnings.catch_warnings changes process-wide state: one decode at a time


class _Keep(logging.Filter):
    """Keeps (and stops) the records logged by the thread holding :data:`_LOCK`; others pass."""

    def __init__(self, owner: int) -> None:
        super().__init__()
        self.owner = owner
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() == self.owner:  # filters run in the logging thread
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[tuple[list[logging.LogRecord], list[warnings.WarningMessage]]]:
    """Keep pydicom's (and the pixel plugins') log records and warnings instead of printing them.

    Yields the two lists the records and warnings are collected in. Nothing is handed on: the
    caller decides (see :func:`hand_on`).
    """
    with _LOCK:
        keep = _Keep(threading.get_ident())
        for name in _KNOWN:
            logging.getLogger(name)  # exist now, so that a plugin imported while decoding is covered
        names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _QUIET_ROOTS]
        loggers = [logging.getLogger(n) for n in names]
        for lg in loggers:
            lg.addFilter(keep)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield keep.records, caught
        finally:
            for lg in loggers:
                lg.removeFilter(keep)


def hand_on(records: list[logging.LogRecord], caught: list[warnings.WarningMessage],
            warn_level: int = logging.WARNING) -> None:
    """Pass what pydicom said on as one-line records: warnings at ``warn_level``, its log at DEBUG."""
    for w in caught:
        log.log(warn_level, "%s", one_line(str(w.message)))
    for r in records:
        log.debug("%s: %s", r.name, one_line(r.getMessage()))


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with all whitespace runs (newlines included) made single spaces, object reprs such as
    ``<_io.BytesIO object at 0x7f...>`` dropped, cut at ``limit`` characters."""
    s = " ".join(re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(text)).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def transfer_syntax(ds: Any) -> Any:
    """The dataset's Transfer Syntax UID, or None."""
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def check_geometry(ds: Any, name: str) -> None:
    """Rows and Columns present, at least 1 and at most :data:`MAX_SIDE`: refused before decoding."""
    sides = []
    for kw in ("Rows", "Columns"):
        v = None
        try:
            v = getattr(ds, kw, None)
            sides.append(int(v))
        except Exception:  # missing, multi-valued, or a raw element pydicom cannot convert
            raise InputError(name, "an image with Rows and Columns", got=f"{kw} {'missing' if v is None else repr(v)}") from None
    rows, cols = sides
    if min(rows, cols) < 1:
        raise InputError(name, "Rows and Columns of at least 1 pixel", got=f"{rows} x {cols} (rows x columns)")
    if max(rows, cols) > MAX_SIDE:
        raise InputError(name, f"at most {MAX_SIDE} pixels a side (refused before decoding)",
                         got=f"{rows} x {cols} (rows x columns)")


def decode_pixels(ds: Any, name: str) -> np.ndarray:
    """The stored values of a one-frame image, as pydicom returns them (``ds.pixel_array``).

    Colour comes back as RGB ``[H, W, 3]``: pydicom converts YBR_FULL and YBR_FULL_422 (JPEG
    baseline) and the JPEG 2000 codec undoes YBR_ICT/YBR_RCT.

    Raises :class:`InputError` (one line, naming ``name``) for a geometry outside 1..MAX_SIDE,
    a transfer syntax with no decoder here, a truncated or undecodable codestream, and
    non-finite float pixel values.
    """
    check_geometry(ds, name)
    ts = transfer_syntax(ds)
    ts_name = one_line(getattr(ts, "name", None) or str(ts)) if ts else "(no Transfer Syntax UID)"
    _check_decoder(ts, ts_name, name)
    _check_codestream_end(ds, ts, ts_name, name)
    failure: Exception | None = None
    with quiet_pydicom() as (records, caught):
        try:
            arr = ds.pixel_array
        except Exception as exc:  # every decoder error, whatever its type, becomes one line
            failure = exc
    if failure is not None:
        hand_on(records, caught, logging.DEBUG)  # the error below says it all, in one line
        raise InputError(name, f"pixel data that decodes as {ts_name}", got=_describe(failure)) from None
    hand_on(records, caught)
    if arr.dtype.kind == "f":
        element = next((k for k in ("Float Pixel Data", "Double Float Pixel Data") if k.replace(" ", "") in ds),
                       "Pixel Data")
        _check_finite(arr, name, element)
    return arr


def _check_decoder(ts: Any, ts_name: str, name: str) -> None:
    if ts is None or not getattr(ts, "is_encapsulated", False):
        return  # native data: pydicom reads it without a plugin
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputError(name, f"pixel data in a transfer syntax decoded here: {SUPPORTED}", got=ts_name) from None
    if not decoder.is_available:
        missing = one_line("; ".join(str(m) for m in decoder.missing_dependencies)) or "no plugin"
        raise InputError(name, f"an installed decoder for {ts_name} (the pylibjpeg plugins Hygeia depends on)",
                         got=f"none installed ({missing})")


def _check_codestream_end(ds: Any, ts: Any, ts_name: str, name: str) -> None:
    """JPEG, JPEG-LS and JPEG 2000 codestreams end with FFD9 (EOI / EOC), perhaps then padding."""
    from pydicom import uid

    jpeg_family = (*uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes, *uid.JPEG2000TransferSyntaxes)
    if ts is None or ts not in jpeg_family or "PixelData" not in ds:
        return
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:
        raise InputError(name, f"encapsulated {ts_name} pixel data (PS3.5 A.4)", got=_describe(exc)) from None
    if frame[:2] not in (b"\xff\xd8", b"\xff\x4f"):
        return  # not a bare codestream (a JP2 file, or garbage): the decoder will judge it
    # Neither JPEG entropy data nor JPEG 2000 packets may contain FF D9, so any in the tail is the end marker.
    if b"\xff\xd9" not in frame[-16:]:
        raise InputError(name, f"a complete {ts_name} codestream",
                         got=f"a truncated codestream ({len(frame)} bytes, no end marker FFD9)")


def _check_finite(arr: np.ndarray, name: str, element: str) -> None:
    nan = int(np.isnan(arr).sum())
    inf = int(np.isinf(arr).sum())
    if nan or inf:
        raise InputError(name, "finite pixel values", got=f"{nan} NaN and {inf} infinite pixel(s) in {element}")


def _describe(exc: BaseException) -> str:
    """One line for a decoding failure; pydicom's 'every plugin failed' list becomes 'a: ...; b: ...'."""
    text = str(exc)
    head = "Unable to decode as exceptions were raised by all available plugins:"
    if text.startswith(head):
        parts = [one_line(p) for p in text[len(head):].split("\n") if p.strip()]
        return one_line("decoder errors: " + "; ".join(parts))
    return one_line(f"{type(exc).__name__}: {text}")
