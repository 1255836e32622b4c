"""The file side of :mod:`hygeia.data.labels`: CSV rows with their line numbers, label values,
image paths that must exist, patients from paths, and box files. A private module."""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

_PATIENT_IN_PATH = re.compile(r"(patient\d+)", re.IGNORECASE)
_NIH_PATIENT = re.compile(r"^(\d+)_\d+$")
_BOX_ALIASES = {"infiltrate": "Infiltration"}  # NIH's BBox_List says Infiltrate, Data_Entry Infiltration

Rows = list[tuple[int, int, list[str]]]
"""CSV data rows: (row number from 1, header excluded; line number in the file; cells)."""


@dataclass(frozen=True)
class Box:
    """A finding's bounding box in pixel coordinates of the image: top-left (x, y), width, height."""

    finding: str
    x: float
    y: float
    w: float
    h: float


def col(header: Sequence[str], *names: str) -> int | None:
    """Index of the first of ``names`` in ``header`` (case-insensitive), or None."""
    low = [h.lower() for h in header]
    return next((low.index(n.lower()) for n in names if n.lower() in low), None)


def where(path: Path, row: int, line: int) -> str:
    return f"row {row} (line {line}) of {str(path)!r}"


def read_csv(path: Path, strict: bool = True) -> tuple[list[str], Rows]:
    """Header (trailing unnamed columns dropped) and data rows, blank lines skipped.

    ``strict``: a row with fewer cells than the header, or with more non-blank ones, is an
    InputError naming it; otherwise short rows are padded with blanks.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"label file {str(path)!r}", "a readable CSV file (UTF-8, comma-separated)",
                         got=f"{type(exc).__name__}: {exc}"[:300]) from None
    rows = [(line, r) for line, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"label file {str(path)!r}", "a CSV file with a header row", got="an empty file")
    header = [h.strip() for h in rows[0][1]]
    while header and not header[-1]:
        header.pop()
    out: Rows = []
    for row, (line, cells) in enumerate(rows[1:], start=1):
        if strict:
            if len(cells) < len(header) or any(c.strip() for c in cells[len(header):]):
                raise InputError(where(path, row, line), f"{len(header)} comma-separated fields as in the header",
                                 got=f"{len(cells)} fields")
            cells = cells[:len(header)]
        out.append((row, line, list(cells) + [""] * max(0, len(header) - len(cells))))
    return header, out


def value(cell: Any, place: str, uncertain: float) -> float:
    """1, 0, -1 (uncertain -> the policy) or blank/None (NaN); anything else is an InputError."""
    s = "" if cell is None else str(cell).strip()
    if s == "":
        return float("nan")
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if v not in (1.0, 0.0, -1.0):
        raise InputError(place, "1, 0, -1 (uncertain) or blank", got=repr(cell))
    return uncertain if v == -1.0 else v


def patient_of(image: str) -> str:
    """``patientNNNNN`` in the path (CheXpert), else the NIH ``NNNNNNNN_`` prefix, else the file name."""
    m = _PATIENT_IN_PATH.search(image.replace("\\", "/"))
    if m:
        return m.group(1)
    stem = Path(image).stem
    n = _NIH_PATIENT.match(stem)
    return n.group(1) if n else stem


def _candidates(name: str, root: Path, label_dir: Path, layout: str, own_root: bool) -> list[Path]:
    p = Path(name)
    if p.is_absolute():
        return [p]
    out = [root / p]
    if layout == "nih":
        out.append(root / "images" / p)
    if layout == "chexpert" and not own_root and p.parts and p.parts[0] == label_dir.name:
        out.append(label_dir.parent / p)  # CheXpert's own paths start with the dataset folder
    return out


def resolve(name: str, root: Path | None, label_file: Path, layout: str) -> tuple[str | None, Path]:
    """(absolute path of the existing image or None, the first place looked)."""
    cands = _candidates(name, root or label_file.parent, label_file.parent, layout, root is not None)
    for c in cands:
        if c.is_file():
            return os.path.abspath(c), cands[0]
    return None, Path(os.path.abspath(cands[0]))


class Images:
    """Resolves each row's image; remembers the first missing one and how many are missing."""

    def __init__(self, label_file: Path, root: Path | None, layout: str) -> None:
        self.label_file, self.root, self.layout = label_file, root, layout
        self.first: tuple[str, str] | None = None
        self.missing = 0

    def __call__(self, name: Any, place: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"image of {place}", "an image path", got=repr(name))
        found, tried = resolve(name.strip(), self.root, self.label_file, self.layout)
        if found is None:
            self.missing += 1
            if self.first is None:
                self.first = (place, f"{name!r} (looked for {tried})")
            return ""
        return found

    def check(self) -> None:
        """Raise the first missing image (with how many more there are)."""
        if self.first is not None:
            place, got = self.first
            more = f"; {self.missing - 1} more rows name missing images" if self.missing > 1 else ""
            raise InputError(f"image of {place}", "an existing image file (paths are relative to --image-root, "
                             "default the label file's folder)", got=got + more)


def track(rows: Sequence[Any], progress: bool, what: str) -> Iterable[Any]:
    """``rows`` with a transient rich progress bar when ``progress``."""
    from rich.progress import track as rich_track

    return rich_track(rows, description=what, total=len(rows), transient=True, disable=not progress)


def _box_columns(header: list[str], path: Path) -> tuple[int, int, list[int]]:
    image = col(header, "Image Index", "Path", "image")
    finding = col(header, "Finding Label", "finding", "label")
    bbox = next((i for i, h in enumerate(header) if h.lower().startswith("bbox")), None)
    xywh = [col(header, c) for c in "xywh"]
    coords = list(range(bbox, bbox + 4)) if bbox is not None else [int(i) for i in xywh if i is not None]
    if image is None or finding is None or len(coords) != 4:
        raise InputError(f"columns of box file {str(path)!r}", "Image Index, Finding Label and x, y, w, h "
                         "(or NIH's 'Bbox [x,y,w,h]')", got=", ".join(header))
    return image, finding, coords


def read_boxes(path: Path, resolve_image: Callable[[str], str | None]) -> dict[str, list[Box]]:
    """Boxes by resolved image path; rows whose image is not found are left out."""
    if not path.is_file():
        raise InputError(f"box file {str(path)!r}", "an existing CSV file", got="no such file")
    header, rows = read_csv(path, strict=False)
    ii, fi, coords = _box_columns(header, path)
    out: dict[str, list[Box]] = {}
    for row, line, cells in rows:
        cells = cells + [""] * (max(coords) + 1 - len(cells))
        try:
            x, y, w, h = (float(cells[i]) for i in coords)
        except ValueError:
            raise InputError(f"box in {where(path, row, line)}", "numbers x, y, w, h",
                             got=", ".join(cells[i] for i in coords)) from None
        if w < 0 or h < 0:
            raise InputError(f"box in {where(path, row, line)}", "a width and height >= 0", got=f"{w}, {h}")
        name = cells[fi].strip()
        image = resolve_image(cells[ii].strip())
        if image is not None:
            out.setdefault(image, []).append(Box(_BOX_ALIASES.get(name.lower(), name), x, y, w, h))
    return out
