"""Read one 2D image from disk into the diagnoser's input space.

:func:`load_image` reads PNG/JPEG/BMP/TIFF (Pillow), DICOM (pydicom) and ``.npy``/``.npz``
(numpy, ``allow_pickle=False``) and returns float32 intensities ``[H, W]`` in [0, 1].
:func:`prepare_image` resizes them to a model's input size with MONAI.

DICOM intensities follow the standard display pipeline (PS3.4 Grayscale Standard Display
Pipeline): stored values -> Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence)
-> VOI LUT (VOI LUT Sequence or Window Center/Width, the first one when several are given)
-> [0, 1] using the output range of that VOI transform; without any VOI in the file the image's
own min..max is used. MONOCHROME1 images are inverted so that 1.0 is always white (high
attenuation). Colour images are converted to luminance (ITU-R 601 weights).

DICOM pixel data is decoded by :mod:`hygeia.data.decode`: every transfer syntax a PACS sends
(uncompressed, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), images of
at most 16384 pixels a side (refused before decoding), each failure one InputError line
(docs/reading-images.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .decode import decode_pixels, hand_on, one_line, quiet_pydicom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NUMPY_SUFFIXES = {".npy", ".npz"}
_EXPECTED = "a 2D image file: DICOM (PS3.10), PNG, JPEG, BMP, TIFF, .npy or .npz"


@dataclass
class LoadedImage:
    """One image read by :func:`load_image`.

    ``pixels``: float32 ``[H, W]`` in [0, 1] (1.0 = white after MONOCHROME1 inversion);
    ``pixel_spacing``: (row, column) spacing in mm, or None when the file does not say;
    ``dataset``: the pydicom Dataset (DICOM input only, else None); ``path``: where it came from
    (None when built from an in-memory dataset).
    """

    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    dataset: Any | None  # pydicom.Dataset
    path: Path | None

    @property
    def size(self) -> tuple[int, int]:
        """(rows, columns)."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def load_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read a 2D image as float32 ``[H, W]`` in [0, 1].

    Raises :class:`hygeia.errors.InputError` naming the file when it does not exist, is not a
    readable image, is DICOM without pixel data, is 3D (several frames or a stack), has no or
    more than :data:`hygeia.data.decode.MAX_SIDE` pixels a side, holds a truncated or
    undecodable codestream or a transfer syntax with no decoder here, or holds NaN/infinite
    float pixels. The message is one line; pydicom's own log and warnings are kept off the
    console (handed on as one-line records of the ``hygeia.data.decode`` logger).
    """
    p = Path(path)
    name = f"image file {str(p)!r}"
    if not p.exists():
        raise InputError(name, "an existing file", got="no such file")
    if not p.is_file():
        raise InputError(name, _EXPECTED, got="a directory" if p.is_dir() else "not a regular file")
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return LoadedImage(_read_pillow(p, name), None, None, p)
    if suffix in NUMPY_SUFFIXES:
        return LoadedImage(_read_numpy(p, name), None, None, p)
    from pydicom.errors import InvalidDicomError

    try:
        ds = _read_dicom(p)
    except InvalidDicomError:
        raise InputError(name, _EXPECTED, got="a file that is none of these (no DICM preamble)") from None
    except Exception as exc:  # truncated or corrupt files raise many kinds of errors
        raise InputError(name, "a readable DICOM file", got=one_line(f"{type(exc).__name__}: {exc}")) from None
    return load_dataset(ds, path=p)


def _read_dicom(p: Path) -> Any:
    """``pydicom.dcmread`` with what pydicom logs and warns kept, and handed on as one-line records."""
    import pydicom

    with quiet_pydicom() as (records, caught):
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            hand_on(records, caught, logging.DEBUG)
            raise
    hand_on(records, caught)
    return ds


def load_series(folder: str | os.PathLike[str]) -> list[LoadedImage]:
    """Every DICOM image under ``folder`` (recursively), ordered by study, series, instance number.

    Files that are not DICOM (no ``DICM`` preamble) are skipped; DICOM files that are not usable
    2D images (no pixel data, several frames, undecodable pixels) raise InputError naming the
    file. InputError too when the folder holds no DICOM image at all.
    """
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"DICOM folder {str(root)!r}", "an existing folder", got="no such folder")
    items = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        try:
            ds = _read_dicom(p)
        except InvalidDicomError:
            continue
        except Exception as exc:
            raise InputError(f"DICOM file {str(p)!r}", "a readable DICOM file",
                             got=one_line(f"{type(exc).__name__}: {exc}")) from None
        key = (str(getattr(ds, "StudyInstanceUID", "")), str(getattr(ds, "SeriesInstanceUID", "")),
               int(getattr(ds, "InstanceNumber", 0) or 0), str(p))
        items.append((key, load_dataset(ds, path=p)))
    if not items:
        raise InputError(f"DICOM folder {str(root)!r}", "at least one DICOM image", got="none")
    return [li for _, li in sorted(items, key=lambda t: t[0])]


def load_dataset(ds: Any, path: Path | None = None, name: str | None = None) -> LoadedImage:
    """Like :func:`load_image` for a pydicom Dataset already in memory (e.g. received by C-STORE)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    name = name or (f"DICOM file {str(path)!r}" if path else "DICOM dataset")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        sop_name = str(getattr(sop, "name", sop))
        sop_text = "?" if sop is None else (f"{sop_name}, {sop}" if sop_name != str(sop) else str(sop))
        raise InputError(name, "a DICOM image with pixel data", got=f"no Pixel Data (SOP Class {sop_text})")
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(name, "a 2D image (one frame)", got=f"Number of Frames {ds.NumberOfFrames!r}") from None
    if frames > 1:
        raise InputError(name, "a 2D image (one frame)", got=f"a volume of {frames} frames")
    arr = decode_pixels(ds, name)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(name, "a 2D colour image [H, W, 3]", got=f"shape {list(arr.shape)}")
        # pydicom (>= 3) already returns RGB for YBR_FULL/YBR_FULL_422, and the JPEG 2000 codec
        # for YBR_ICT/YBR_RCT: converting again would shift every colour
        a = arr.astype(np.float64)
        a = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
        pixels = a / float(2 ** int(getattr(ds, "BitsStored", 8) or 8) - 1)
    else:
        if arr.ndim != 2:
            raise InputError(name, "a 2D image", got=f"pixel array of shape {list(arr.shape)}")
        pixels = _dicom_gray(ds, arr, apply_modality_lut, apply_voi_lut)
        if photometric == "MONOCHROME1":
            pixels = 1.0 - pixels
    pixels = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0).astype(np.float32)
    return LoadedImage(np.ascontiguousarray(pixels), dicom_pixel_spacing(ds), ds, path)


def dicom_pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, column) spacing in mm from Pixel Spacing, Imager Pixel Spacing or Nominal Scanned Pixel Spacing."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        v = getattr(ds, kw, None)
        if v is not None and len(v) == 2:
            try:
                return float(v[0]), float(v[1])
            except (TypeError, ValueError):
                continue
    return None


def _dicom_gray(ds: Any, arr: np.ndarray, modality_lut: Any, voi_lut: Any) -> np.ndarray:
    """Stored values -> Modality LUT -> VOI LUT -> [0, 1] (MONOCHROME1 not yet inverted)."""
    values = modality_lut(arr, ds).astype(np.float64)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        try:
            out = np.asarray(voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
            # The VOI output range: push the most extreme inputs through the same transform.
            lo, hi = np.asarray(voi_lut(np.array([-1e12, 1e12]), ds, index=0, prefer_lut=True), np.float64)
            lo, hi = min(lo, hi), max(lo, hi)
            if hi > lo:
                return (out - lo) / (hi - lo)
        except Exception:  # malformed VOI attributes: fall back to the full range, as viewers do
            pass
    return _minmax(values)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def _read_pillow(p: Path, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise InputError(name, "a 2D image (one frame)", got=f"{n_frames} frames")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                if mode.startswith("I;16"):
                    return (a / 65535.0).astype(np.float32)
                return _minmax(a).astype(np.float32)
            if mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
                return (np.asarray(im.convert("L"), dtype=np.float32) / 255.0).astype(np.float32)
            raise InputError(name, "a grayscale or colour image", got=f"Pillow mode {mode}")
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(name, _EXPECTED, got=f"unreadable {p.suffix} content") from None
    except Exception as exc:
        raise InputError(name, _EXPECTED, got=f"{type(exc).__name__}: {exc}"[:300]) from None


def _read_numpy(p: Path, name: str) -> np.ndarray:
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise InputError(name, "a numpy .npy/.npz file (no pickled objects)", got=f"{type(exc).__name__}: {exc}"[:300]) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = list(data.files)
            key = next((k for k in ("image", "pixels", "arr_0") if k in keys), keys[0] if keys else None)
            if key is None:
                raise InputError(name, "an .npz archive holding an array 'image'", got="an empty archive")
            a = data[key]
    else:
        a = data
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InputError(name, "a 2D array [H, W] (or [1, H, W])", got=f"shape {list(a.shape)}")
    if a.dtype.kind not in "fiub" or a.size == 0:
        raise InputError(name, "a non-empty numeric array", got=f"dtype {a.dtype}, size {a.size}")
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise InputError(name, "finite values", got="NaN/inf values")
        if a.min() >= 0.0 and a.max() <= 1.0:
            return a.astype(np.float32)
        return _minmax(a).astype(np.float32)
    if a.dtype == np.uint8:
        return (a / 255.0).astype(np.float32)
    if a.dtype == np.uint16:
        return (a / 65535.0).astype(np.float32)
    return _minmax(a).astype(np.float32)


def prepare_image(pixels: np.ndarray, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Resize ``[H, W]`` (or ``[1, H, W]``) float pixels to float32 ``[1, *size]`` in [0, 1].

    Uses MONAI ``Resize``: ``mode="area"`` (average over the source pixels each target pixel
    covers, which anti-aliases) when shrinking, ``mode="bilinear"`` (``align_corners=False``)
    when enlarging. Each axis is treated separately, so the aspect ratio is not kept (a chest
    film is taken as a whole, as the diagnosers are trained).
    """
    from monai.transforms import Resize

    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InputError("pixels", "a 2D array [H, W] or [1, H, W]", got=f"shape {list(a.shape)}")
    if a.size == 0 or not np.issubdtype(a.dtype, np.number):
        raise InputError("pixels", "a non-empty numeric array", got=f"dtype {a.dtype}, shape {list(a.shape)}")
    if len(size) != 2 or min(size) <= 0:
        raise InputError("size", "(rows, columns) > 0", got=size)
    a = a.astype(np.float32)[None]
    if tuple(a.shape[1:]) == tuple(size):
        return np.clip(a, 0.0, 1.0)
    shrink = a.shape[1] >= size[0] and a.shape[2] >= size[1]
    mode = "area" if shrink else "bilinear"
    kwargs: dict[str, Any] = {} if shrink else {"align_corners": False}
    out = Resize(spatial_size=tuple(size), mode=mode, **kwargs)(a)
    out = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)
