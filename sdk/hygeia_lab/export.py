"""Labelled phantom datasets on disk, shaped like a user's: ``hygeia phantoms export``.

:func:`export_phantoms` writes ``n`` phantoms (:func:`hygeia_lab.phantoms.make_phantom`) as
images (DICOM DX through the registry's ``dicom-dx`` output format, optionally re-encoded in a
compressed transfer syntax, or 16-bit PNG) with a label file in one of the layouts that
:func:`hygeia.data.labels.read_labels` reads:

- ``chexpert``: ``train.csv`` / ``valid.csv`` / ``test.csv`` with ``Path,Sex,Age,Frontal/Lateral,
  AP/PA,[Indication,]No Finding,<findings>`` and images under ``train/patientNNNNN/study1/``;
- ``nih``: ``Data_Entry.csv`` (``Image Index``, ``Finding Labels``, ``Patient ID`` ...),
  ``BBox_List.csv`` (a box per present finding, from the phantom's regions) and ``images/``;
- ``datalist``: a MONAI ``dataset.json`` (``findings``, then ``training`` / ``validation`` /
  ``test`` items with a 0/1 ``label`` list and a ``patient``) and ``imagesTr/`` (``imagesVal/``,
  ``imagesTs/``).

One image per patient. Image ``i`` of (``split``, ``seed``) is the phantom of seed
``SeedSequence([0x4558504F, split id, seed, i])``: a stream of its own, so an export never
repeats a phantom the built-in models were trained on, and the train, val and test exports of
one seed never share one. Everything is written into a temporary folder that replaces ``out``
only when complete; ``phantoms.json`` records the seeds and settings.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.api import ModelIdentity
from hygeia.errors import InputError
from hygeia.outputs import SYNTHETIC_NOTE, atomic_dir
from hygeia.vocab import FINDING_LABELS

from .phantom_generator import NAME, VERSION, as_generated_image
from .phantoms import SPLITS, Phantom, code_hash, make_phantom

__all__ = ["FORMATS", "LAYOUTS", "TRANSFER_SYNTAXES", "export_phantoms", "export_seed", "finding_names"]

LAYOUTS = ("chexpert", "nih", "datalist")
FORMATS = ("dicom", "png")
MAX_N = 100_000
_STREAM = 0x4558504F  # "EXPO"
_IDENTITY = ModelIdentity(NAME, VERSION, "generator", None)
_PATIENT_OFFSET = {"train": 0, "val": 100_000, "test": 200_000}  # patient numbers never shared between splits

TRANSFER_SYNTAXES: dict[str, tuple[str, dict[str, Any], list[str] | None]] = {
    # name: (pydicom.uid keyword, pydicom encoder options, dcmtk command used when pydicom cannot encode)
    "explicit": ("ExplicitVRLittleEndian", {}, None),
    "deflate": ("DeflatedExplicitVRLittleEndian", {}, None),
    "rle": ("RLELossless", {}, ["dcmcrle"]),
    "jpegls": ("JPEGLSLossless", {}, ["dcmcjpls"]),
    "jpegls-near": ("JPEGLSNearLossless", {"jls_error": 2}, ["dcmcjpls", "+en", "+md", "2"]),
    "jpeg2000": ("JPEG2000Lossless", {}, None),
    "jpeg2000-lossy": ("JPEG2000", {"j2k_cr": [10]}, None),
    "jpeg-lossless": ("JPEGLosslessSV1", {}, ["dcmcjpeg", "+e1"]),
}
"""``--transfer-syntax`` names. Encoded with pydicom (``Dataset.compress``, through the pylibjpeg
and pyjpegls plugins) where it can, else with dcmtk's tool on the PATH."""
_LOSSY = {"jpegls-near": "ISO_14495_1", "jpeg2000-lossy": "ISO_15444_1"}

EXPORT_DIFFICULTY = 2.0
"""The difficulty of exported phantoms (``--difficulty`` overrides): smaller effusions and
pneumothoraces and fainter findings than the in-memory default (1.0), so that at 256 px the best
image-only model does not saturate (docs/phantoms.md, "Difficulty")."""

_NAMES = {
    "chexpert": {"nodule": "Nodule", "consolidation": "Consolidation", "effusion": "Pleural Effusion",
                 "cardiomegaly": "Cardiomegaly", "pneumothorax": "Pneumothorax"},
    "nih": {"nodule": "Nodule", "consolidation": "Consolidation", "effusion": "Effusion",
            "cardiomegaly": "Cardiomegaly", "pneumothorax": "Pneumothorax"},
}
_NAMES["datalist"] = {k: k for k in FINDING_LABELS}  # the phantoms' own labels (a datalist has no canonical names)
_CHEXPERT_ORDER = ("cardiomegaly", "nodule", "consolidation", "pneumothorax", "effusion")  # CheXpert's column order
_NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def finding_names(layout: str) -> dict[str, str]:
    """Phantom finding label -> the name the ``layout``'s label file uses, in file order (the
    CheXpert file also has ``No Finding`` first)."""
    _check_choice("--layout", layout, LAYOUTS)
    order = _CHEXPERT_ORDER if layout == "chexpert" else FINDING_LABELS
    names = {k: _NAMES[layout][k] for k in order}
    return names if layout != "nih" else dict(sorted(names.items(), key=lambda kv: kv[1]))


def export_seed(split: str, seed: int, index: int) -> int:
    """The phantom seed of image ``index`` of an export of (``split``, ``seed``)."""
    return int(np.random.SeedSequence([_STREAM, SPLITS[split], int(seed), int(index)]).generate_state(1, np.uint64)[0])


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | dict[str, Any]) -> str:
    if value not in choices:
        raise InputError(name, f"one of {', '.join(choices)}", got=repr(value))
    return str(value)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise InputError(name, f"an integer in [{lo}, {hi}]", got=repr(value))
    return int(value)


def _encoder(name: str) -> Callable[[Path], None] | None:
    """A function re-encoding a DICOM file in transfer syntax ``name`` in place (None: keep it)."""
    if name == "explicit":
        return None
    import pydicom
    from pydicom import uid as uids

    keyword, options, tool = TRANSFER_SYNTAXES[name]
    ts = getattr(uids, keyword)
    if name == "deflate":
        def deflate(path: Path) -> None:
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = ts
            ds.save_as(path, enforce_file_format=True)
        return deflate
    from pydicom.pixels import get_encoder

    encoder = get_encoder(ts) if ts in _pydicom_encodable() else None
    if encoder is not None and encoder.is_available:
        def compress(path: Path) -> None:
            ds = pydicom.dcmread(path)
            raw = len(ds.PixelData)
            ds.compress(ts, **options)
            _mark_lossy(ds, name, raw)
            ds.save_as(path, enforce_file_format=True)
        return compress
    if tool is not None and shutil.which(tool[0]):
        def dcmtk(path: Path) -> None:
            tmp = path.with_name(path.name + ".tmp")
            subprocess.run([*tool, str(path), str(tmp)], check=True, capture_output=True)
            os.replace(tmp, path)
        return dcmtk
    why = ", ".join(getattr(encoder, "missing_dependencies", []) or ["no pydicom encoder"])
    dcmtk_note = f"; dcmtk's {tool[0]} is not on the PATH" if tool else ""
    raise InputError("--transfer-syntax", f"an installed encoder for {name} ({keyword})",
                     got=f"none: {why}{dcmtk_note}")


def _pydicom_encodable() -> set[str]:
    from pydicom import uid as uids

    names = ("RLELossless", "JPEGLSLossless", "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000")
    return {getattr(uids, k) for k in names}


def _mark_lossy(ds: Any, name: str, raw_bytes: int) -> None:
    """Lossy encodings say so (PS3.3 C.7.6.1.1.5): LossyImageCompression 01, ratio and method."""
    if name in _LOSSY:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{raw_bytes / max(1, len(ds.PixelData)):.2f}"
        ds.LossyImageCompressionMethod = _LOSSY[name]


def _write_png(path: Path, p: Phantom) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Description", SYNTHETIC_NOTE)
    info.add_text("Software", f"hygeia {NAME} generator {VERSION}")
    info.add_text("Comment", f"SYNTHETIC PHANTOM seed={p.seed}")
    px = np.round(np.clip(p.image, 0, 1) * 65535).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, format="PNG", pnginfo=info)


def _write_image(path: Path, p: Phantom, fmt: str, writer: Any, encode: Callable[[Path], None] | None) -> None:
    if fmt == "png":
        _write_png(path, p)
        return
    writer.write([as_generated_image(p, _IDENTITY)], path.parent, filenames=[path.name])
    if encode is not None:
        encode(path)


def _relpath(layout: str, split: str, number: int, ext: str) -> str:
    if layout == "chexpert":
        folder = {"train": "train", "val": "valid", "test": "test"}[split]
        return f"{folder}/patient{number:05d}/study1/view1_frontal{ext}"
    if layout == "nih":
        return f"images/{number:08d}_000{ext}"
    folder = {"train": "imagesTr", "val": "imagesVal", "test": "imagesTs"}[split]
    return f"{folder}/phantom_{number:05d}{ext}"


def _box(region: Any) -> tuple[float, float, float, float]:
    """(x, y, w, h) around a region's coordinates."""
    xs = [c[0] for c in region.coords]
    ys = [c[1] for c in region.coords]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def _record(p: Phantom, layout: str, split: str, number: int, ext: str) -> dict[str, Any]:
    names = _NAMES[layout]
    return {"path": _relpath(layout, split, number, ext), "number": number, "phantom_seed": p.seed,
            "labels": {names[k]: int(v) for k, v in p.labels.items()}, "text": p.text,
            "sex": p.meta.get("sex", "O"), "age": int(p.meta.get("age", 50)), "size": p.image.shape[0],
            "spacing": float(p.pixel_spacing[0]),
            "boxes": [(names[k], *_box(r)) for k, r in sorted(p.regions.items())]}


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _write_chexpert(folder: Path, recs: list[dict[str, Any]], split: str, text: bool) -> str:
    names = list(finding_names("chexpert").values())
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *(["Indication"] if text else []), "No Finding", *names]
    rows = []
    for r in recs:
        found = [r["labels"][n] for n in names]
        rows.append([r["path"], {"F": "Female", "M": "Male"}.get(r["sex"], "Unknown"), r["age"], "Frontal", "PA",
                     *([r["text"]] if text else []), f"{float(not any(found)):.1f}", *(f"{float(v):.1f}" for v in found)])
    name = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}[split]
    _csv(folder / name, header, rows)
    return name


def _write_nih(folder: Path, recs: list[dict[str, Any]], text: bool) -> str:
    rows, boxes = [], []
    for r in recs:
        present = sorted(n for n, v in r["labels"].items() if v)
        rows.append([Path(r["path"]).name, "|".join(present) or "No Finding", 0, r["number"], r["age"], r["sex"], "PA",
                     r["size"], r["size"], f"{r['spacing']:.6g}", f"{r['spacing']:.6g}", *([r["text"]] if text else [])])
        boxes += [[Path(r["path"]).name, n, *(f"{v:.1f}" for v in xywh)] for n, *xywh in r["boxes"]]
    _csv(folder / "Data_Entry.csv", _NIH_HEADER + (["Indication"] if text else []), rows)
    _csv(folder / "BBox_List.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"], boxes)
    return "Data_Entry.csv"


def _write_datalist(folder: Path, recs: list[dict[str, Any]], split: str, text: bool) -> str:
    names = list(finding_names("datalist").values())
    key = {"train": "training", "val": "validation", "test": "test"}[split]
    items = [{"image": r["path"], "label": [r["labels"][n] for n in names], "patient": f"patient{r['number']:05d}",
              **({"Indication": r["text"]} if text else {})} for r in recs]
    doc = {"name": "Hygeia phantoms", "description": "Synthetic chest radiograph phantoms (hygeia_lab.phantoms); "
           "no patient images", "tensorImageSize": "2D", "modality": {"0": "DX"}, "findings": names,
           f"num{key.capitalize()}": len(items), key: items}
    (folder / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    return "dataset.json"


def export_phantoms(out: str | os.PathLike[str], layout: str = "chexpert", n: int = 100, size: int = 256,
                    image_format: str = "dicom", transfer_syntax: str = "explicit", seed: int = 0, split: str = "train",
                    text: bool = False, difficulty: float | None = None, overwrite: bool = False,
                    progress: bool = True, mimics: float = 0.0) -> Path:
    """Write a labelled phantom dataset into the folder ``out``; returns the label file's path.

    ``out`` must be new or empty unless ``overwrite``. ``transfer_syntax`` (DICOM only) is one of
    :data:`TRANSFER_SYNTAXES`; a missing encoder is an InputError before anything is drawn.
    ``text`` adds the phantom's clinical indication as ``Indication``; ``mimics`` (0-1) draws
    look-alikes of absent findings (:data:`hygeia_lab.phantoms.MIMIC_RATES`).
    """
    _check_choice("--layout", layout, LAYOUTS)
    difficulty = EXPORT_DIFFICULTY if difficulty is None else difficulty
    _check_choice("--format", image_format, FORMATS)
    _check_choice("--transfer-syntax", transfer_syntax, TRANSFER_SYNTAXES)
    _check_choice("--split", split, tuple(SPLITS))
    n, size = _check_int("-n", n, 1, MAX_N), _check_int("--size", size, 16, 1024)
    seed = _check_int("--seed", seed, 0, 2 ** 32 - 1)
    if isinstance(mimics, bool) or not isinstance(mimics, (int, float)) or not 0 <= mimics <= 1:
        raise InputError("--mimics", "a number in [0, 1]", got=repr(mimics))
    if image_format == "png" and transfer_syntax != "explicit":
        raise InputError("--transfer-syntax", "explicit with --format png (transfer syntaxes are DICOM's)",
                         got=transfer_syntax)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise InputError(f"--out {str(target)!r}", "a folder", got="an existing file")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise InputError(f"--out {str(target)!r}", "a new or empty folder (or --overwrite to replace it)",
                         got="a folder with files in it")
    encode = _encoder(transfer_syntax) if image_format == "dicom" else None
    writer = None
    if image_format == "dicom":
        from hygeia.plugins import get_registry

        writer = get_registry().output_format("dicom-dx")
    ext = ".dcm" if image_format == "dicom" else ".png"
    from rich.progress import track

    with atomic_dir(target) as tmp:
        recs = []
        for i in track(range(n), description=f"exporting {layout} phantoms", transient=True, disable=not progress):
            p = make_phantom(export_seed(split, seed, i), size=size, difficulty=difficulty, mimics=mimics)
            rec = _record(p, layout, split, _PATIENT_OFFSET[split] + i + 1, ext)
            _write_image(tmp / rec["path"], p, image_format, writer, encode)
            recs.append(rec)
        if layout == "chexpert":
            label_file = _write_chexpert(tmp, recs, split, text)
        elif layout == "nih":
            label_file = _write_nih(tmp, recs, text)
        else:
            label_file = _write_datalist(tmp, recs, split, text)
        _write_provenance(tmp, recs, layout=layout, split=split, seed=seed, n=n, size=size, format=image_format,
                          transfer_syntax=transfer_syntax if image_format == "dicom" else None,
                          difficulty=float(difficulty), mimics=float(mimics), label_file=label_file,
                          text=bool(text))
    return target / label_file


def _write_provenance(folder: Path, recs: list[dict[str, Any]], **settings: Any) -> None:
    doc = {"synthetic": True, "note": SYNTHETIC_NOTE, "generator": f"hygeia {NAME} {VERSION}",
           "phantom_code_sha256": code_hash(), **settings,
           "images": [{"path": r["path"], "phantom_seed": r["phantom_seed"]} for r in recs]}
    (folder / "phantoms.json").write_text(json.dumps(doc, indent=2) + "\n")
