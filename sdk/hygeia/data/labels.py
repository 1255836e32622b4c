"""Labelled studies in the layouts users already have, read into one :class:`LabelTable`.

:func:`read_labels` reads

- a CheXpert-style CSV: ``Path`` (relative to ``image_root``, else the CSV's folder), an optional
  patient column (``Patient ID``; else ``patientNNNNN`` from the path, else the file name) and one
  column per finding holding 1, 0, -1 (uncertain) or blank (not mentioned: ignored);
- a ChestX-ray14-style CSV (NIH): ``Image Index``, ``Finding Labels`` (``A|B`` or ``No Finding``)
  and ``Patient ID``; the findings are the labels seen, 0/1; optional boxes from a second CSV;
- a MONAI datalist JSON (Decathlon layout), read with ``monai.data.load_decathlon_datalist``:
  ``label`` is a 0/1 list per finding or a class index; finding names come from a top-level
  ``findings``/``labels`` list or from the codes file.

Each row holds the resolved image path, the patient, a float32 label vector (NaN: ignore this
label for this row), the text of ``text_column`` and the boxes. Every image must exist. Bad input
is a one-line :class:`~hygeia.errors.InputError` naming the file, the row and what was expected.
See docs/user-data.md.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..codes import UserCodes, code_for, read_codes
from ..errors import InputError
from ..vocab import Code
from ._label_files import Box, Images, col, patient_of, read_boxes, read_csv, resolve, track, value, where

__all__ = ["LAYOUTS", "UNCERTAIN", "Box", "LabelRow", "LabelTable", "read_labels"]

LAYOUTS = ("auto", "chexpert", "nih", "datalist")
UNCERTAIN: dict[str, float] = {"ignore": float("nan"), "u-ones": 1.0, "u-zeros": 0.0}
"""What a CheXpert -1 (uncertain) becomes: ignored (NaN), positive or negative."""
NO_FINDING = "No Finding"
_PATIENT_COLUMNS = ("patient id", "patientid", "patient_id", "patient")
_NON_FINDING = {"path", "sex", "age", "frontal/lateral", "ap/pa", "view", "study", "indication", "report", "text",
                *_PATIENT_COLUMNS}
_SPLITS = {"train": "training", "val": "validation", "valid": "validation"}


@dataclass(frozen=True, eq=False)
class LabelRow:
    """One labelled image. ``labels``: float32 ``[F]`` in the table's finding order, NaN where the
    label is to be ignored; ``text``: the text column ("" without one); ``row``: 1-based row of
    the label file (header excluded; the item number in a datalist), for messages."""

    image: str
    labels: np.ndarray
    patient: str
    text: str = ""
    row: int = 0
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True, eq=False)
class LabelTable:
    """The rows of a label file and its findings (the user's names, in column order)."""

    findings: tuple[str, ...]
    rows: tuple[LabelRow, ...]
    source: Path | None = None
    layout: str = ""
    user_codes: Mapping[str, Code] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __getitem__(self, i: int) -> LabelRow:
        return self.rows[i]

    @property
    def labels(self) -> np.ndarray:
        """float32 ``[N, F]``, NaN where ignored."""
        if not self.rows:
            return np.zeros((0, len(self.findings)), np.float32)
        return np.stack([r.labels for r in self.rows]).astype(np.float32)

    @property
    def patients(self) -> tuple[str, ...]:
        """The patient of each row."""
        return tuple(r.patient for r in self.rows)

    def subset(self, indices: Iterable[int]) -> LabelTable:
        """The table of the rows at ``indices`` (same findings)."""
        return replace(self, rows=tuple(self.rows[int(i)] for i in indices))

    def patient_split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[LabelTable, LabelTable]:
        """(train, val) split by patient: no patient on both sides; about ``val_fraction`` of the
        patients (at least one, never all) go to validation, drawn with ``seed``."""
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise InputError("val_fraction", "a number in (0, 1)", got=repr(val_fraction))
        patients = sorted(set(self.patients))
        if len(patients) < 2:
            raise InputError("label table", "images of at least two patients (the split is by patient)",
                             got=f"{len(patients)} patient")
        n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
        val = set(np.random.default_rng(seed).permutation(patients)[:n_val].tolist())
        in_val = [r.patient in val for r in self.rows]
        return (self.subset(i for i, v in enumerate(in_val) if not v),
                self.subset(i for i, v in enumerate(in_val) if v))

    def pos_weight(self) -> np.ndarray:
        """float32 ``[F]``: negatives / positives per finding over the rows where it is not
        ignored (1.0 where a finding has no positive or no negative row)."""
        y = self.labels
        known = ~np.isnan(y)
        pos = np.where(known, y > 0.5, False).sum(0)
        neg = np.where(known, y <= 0.5, False).sum(0)
        return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).astype(np.float32)

    def codes(self) -> tuple[Code, ...]:
        """The code of each finding (:func:`hygeia.codes.code_for` with the table's user codes)."""
        return tuple(code_for(f, self.user_codes or None) for f in self.findings)


def read_labels(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                layout: str = "auto", uncertain: str = "ignore", text_column: str | None = None,
                boxes: str | os.PathLike[str] | None = None, codes: UserCodes = None, *,
                split: str = "training", findings: Sequence[str] | None = None,
                progress: bool = False) -> LabelTable:
    """Read a label file into a :class:`LabelTable`.

    Args:
        path: a CheXpert-style or ChestX-ray14-style CSV, or a MONAI datalist ``.json``.
        image_root: folder the image paths are relative to (default: the label file's folder).
        layout: ``auto`` (from the ``.json`` suffix or the CSV columns), ``chexpert``, ``nih`` or
            ``datalist``.
        uncertain: what -1 becomes: ``ignore`` (NaN), ``u-ones`` (1) or ``u-zeros`` (0).
        text_column: column (datalist: key) holding clinical text, e.g. ``Indication``.
        boxes: CSV of boxes ``Image Index,Finding Label,x,y,w,h`` (or NIH's ``Bbox [x,y,w,h]``).
        codes: the user's codes (a ``finding,code,scheme,meaning`` CSV or a mapping), kept for
            :meth:`LabelTable.codes`; a datalist without finding names takes its names in order.
        split: the datalist list to read (``training``, ``validation``, ``test``; ``train`` and
            ``val`` are accepted).
        findings: read only these findings, in this order (e.g. the training file's, when reading
            its validation file); one the file lacks is an error.
        progress: show a progress bar while the images are checked.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise InputError("layout", f"one of {', '.join(LAYOUTS)}", got=repr(layout))
    policy = str(uncertain).strip().lower().replace("_", "-")
    if policy not in UNCERTAIN:
        raise InputError("uncertain", f"one of {', '.join(UNCERTAIN)}", got=repr(uncertain))
    if not path.is_file():
        raise InputError(f"label file {str(path)!r}", "an existing CSV or JSON file",
                         got="a folder" if path.is_dir() else "no such file")
    user = read_codes(codes) if isinstance(codes, (str, os.PathLike)) else dict(codes or {})
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"image root {str(root)!r}", "an existing folder", got="no such folder")
    want = tuple(findings) if findings is not None else None
    if layout == "datalist" or (layout == "auto" and path.suffix.lower() == ".json"):
        table = _read_datalist(path, root, UNCERTAIN[policy], text_column, user, want, split, progress)
    else:
        header, rows = read_csv(path)
        twice = sorted({h for h in header if h and [x.lower() for x in header].count(h.lower()) > 1})
        if twice:
            raise InputError(f"columns of {str(path)!r}", "each column once", got=f"{', '.join(twice)} more than once")
        kind = layout if layout != "auto" else _detect(header, path)
        reader = _read_nih if kind == "nih" else _read_chexpert
        table = reader(path, header, rows, root, UNCERTAIN[policy], text_column, want, progress)
    if not table.rows:
        raise InputError(f"label file {str(path)!r}", "at least one labelled image", got="no rows")
    if table.labels.size and np.isnan(table.labels).all():  # (a ChestX-ray14 file of normals has no columns)
        raise InputError(f"label file {str(path)!r}", "at least one 0 or 1 label", got="every label blank or ignored")
    table = replace(table, user_codes=user)
    if boxes is not None:
        table = _attach_boxes(table, Path(boxes), root)
    return table


def _detect(header: list[str], path: Path) -> str:
    if col(header, "Image Index") is not None and col(header, "Finding Labels") is not None:
        return "nih"
    if col(header, "Path") is not None:
        return "chexpert"
    raise InputError(f"columns of {str(path)!r}", "a CheXpert-style CSV (a 'Path' column) or a ChestX-ray14-style CSV "
                     "('Image Index', 'Finding Labels', 'Patient ID')", got=", ".join(header) or "none")


def _require(header: list[str], names: Sequence[str], path: Path, layout: str) -> list[int]:
    idx = [col(header, n) for n in names]
    missing = [n for n, i in zip(names, idx) if i is None]
    if missing:
        raise InputError(f"columns of {str(path)!r}", f"the {layout} columns {', '.join(names)}",
                         got=f"no {', '.join(missing)} (columns: {', '.join(header)})")
    return [int(i) for i in idx if i is not None]


def _text_index(header: list[str], text_column: str | None, path: Path) -> int | None:
    if text_column is None:
        return None
    i = col(header, text_column)
    if i is None:
        raise InputError(f"text column {text_column!r}", f"a column of {str(path)!r} ({', '.join(header)})",
                         got="no such column")
    return i


def _select(names: list[str], want: tuple[str, ...] | None, path: Path) -> list[int]:
    """Indices into ``names`` of the findings to read (all of them, or ``want`` in its order)."""
    if want is None:
        return list(range(len(names)))
    missing = [f for f in want if f not in names]
    if missing:
        raise InputError(f"findings of {str(path)!r}", f"the findings {', '.join(want)}",
                         got=f"no {', '.join(missing)} (findings: {', '.join(names)})")
    return [names.index(f) for f in want]


def _read_chexpert(path: Path, header: list[str], rows: list[tuple[int, int, list[str]]], root: Path | None,
                   uncertain: float, text_column: str | None, want: tuple[str, ...] | None,
                   progress: bool) -> LabelTable:
    (pi,) = _require(header, ["Path"], path, "CheXpert")
    pat = col(header, *_PATIENT_COLUMNS)
    ti = _text_index(header, text_column, path)
    skip = {pi, pat, ti}
    fcols = [i for i, h in enumerate(header) if h and i not in skip and h.lower() not in _NON_FINDING]
    fcols = [fcols[k] for k in _select([header[i] for i in fcols], want, path)]
    if not fcols:
        raise InputError(f"columns of {str(path)!r}", "one column per finding besides Path, Sex, Age, "
                         "Frontal/Lateral, AP/PA", got=", ".join(header))
    images, out = Images(path, root, "chexpert"), []
    for row, line, cells in track(rows, progress, "checking images"):
        place = where(path, row, line)
        labels = np.array([value(cells[i], f"label {header[i]!r} in {place}", uncertain) for i in fcols], np.float32)
        image = images(cells[pi], place)
        patient = cells[pat].strip() if pat is not None and cells[pat].strip() else patient_of(cells[pi])
        out.append(LabelRow(image, labels, patient, cells[ti] if ti is not None else "", row))
    images.check()
    return LabelTable(tuple(header[i] for i in fcols), tuple(out), path, "chexpert")


def _nih_labels(cell: str, path: Path, row: int, line: int) -> list[str]:
    names = [s.strip() for s in cell.split("|") if s.strip()]
    if not names:
        raise InputError(f"'Finding Labels' in {where(path, row, line)}", "labels joined by '|', or 'No Finding'",
                         got="blank")
    if NO_FINDING.lower() in (n.lower() for n in names):
        if len(names) > 1:
            raise InputError(f"'Finding Labels' in {where(path, row, line)}",
                             "'No Finding' alone, or findings without it", got=repr(cell))
        return []
    return names


def _read_nih(path: Path, header: list[str], rows: list[tuple[int, int, list[str]]], root: Path | None,
              uncertain: float, text_column: str | None, want: tuple[str, ...] | None,
              progress: bool) -> LabelTable:
    ii, fi = _require(header, ["Image Index", "Finding Labels"], path, "ChestX-ray14")
    pat = col(header, *_PATIENT_COLUMNS)
    ti = _text_index(header, text_column, path)
    parsed = [(row, line, cells, _nih_labels(cells[fi], path, row, line)) for row, line, cells in rows]
    seen = sorted({n for *_, names in parsed for n in names})
    findings = list(want) if want is not None else seen
    if want is not None:
        extra = [n for n in seen if n not in findings]
        if extra:
            raise InputError(f"'Finding Labels' of {str(path)!r}", f"only the findings {', '.join(findings)}",
                             got=", ".join(extra))
    images, out = Images(path, root, "nih"), []
    for row, line, cells, names in track(parsed, progress, "checking images"):
        labels = np.array([float(f in names) for f in findings], np.float32)
        image = images(cells[ii], where(path, row, line))
        patient = cells[pat].strip() if pat is not None and cells[pat].strip() else patient_of(cells[ii])
        out.append(LabelRow(image, labels, patient, cells[ti] if ti is not None else "", row))
    images.check()
    return LabelTable(tuple(findings), tuple(out), path, "nih")


def _datalist_items(path: Path, root: Path | None, split: str) -> tuple[dict[str, Any], str, list[Any], list[Any]]:
    """(the JSON, the list's key, the raw items, MONAI's items with resolved image paths)."""
    from monai.data import load_decathlon_datalist

    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"datalist {str(path)!r}", "a readable JSON file",
                         got=f"{type(exc).__name__}: {exc}"[:300]) from None
    key = _SPLITS.get(split, split)
    lists = [k for k, v in meta.items() if isinstance(v, list) and k not in ("findings", "labels")] \
        if isinstance(meta, dict) else []
    if key not in lists or not meta[key]:
        raise InputError(f"split {split!r} of datalist {str(path)!r}",
                         f"a non-empty list, one of {', '.join(lists) or 'none in the file'}", got="none")
    try:
        items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key,
                                        base_dir=os.path.abspath(root if root is not None else path.parent))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{key!r} of datalist {str(path)!r}", "a list of {\"image\": ..., \"label\": ...} items",
                         got=str(exc)[:300]) from None
    raw = [it if isinstance(it, dict) else {"image": it} for it in meta[key]]
    return meta, key, raw, items


def _datalist_names(meta: dict[str, Any], user: Mapping[str, Code], want: tuple[str, ...] | None,
                    path: Path) -> list[str]:
    names = meta.get("findings", meta.get("labels"))
    if isinstance(names, dict):  # Decathlon: {"0": "name", ...}
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except ValueError:
            names = None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return list(names)
    if want is not None:
        return list(want)
    if user:
        return list(user)
    raise InputError(f"finding names of datalist {str(path)!r}", "a top-level \"findings\" (or \"labels\") list of "
                     "names, or --codes codes.csv naming the findings in label order", got="none")


def _datalist_labels(label: Any, n: int, uncertain: float, path: Path, place: str) -> np.ndarray:
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < n:
            raise InputError(f"label of {place}", f"a class index in [0, {n})", got=label)
        return np.eye(n, dtype=np.float32)[label]
    if isinstance(label, list) and len(label) == n:
        return np.array([value(v, f"label[{k}] of {place}", uncertain) for k, v in enumerate(label)], np.float32)
    raise InputError(f"label of {place}", f"a list of {n} values (1, 0, -1 or null) or a class index",
                     got=repr(label)[:80])


def _read_datalist(path: Path, root: Path | None, uncertain: float, text_column: str | None,
                   user: Mapping[str, Code], want: tuple[str, ...] | None, split: str, progress: bool) -> LabelTable:
    meta, key, raw, items = _datalist_items(path, root, split)
    names = _datalist_names(meta, user, want, path)
    sel = _select(names, want, path)
    if text_column is not None and not any(text_column in it for it in raw):
        raise InputError(f"text key {text_column!r}", f"a key of the items of {key!r} in {str(path)!r}",
                         got="no item has it")
    images, out = Images(path, None, "datalist"), []
    for i, (it, r) in enumerate(track(list(zip(items, raw)), progress, "checking images"), start=1):
        place = f"item {i} of {key!r} in {str(path)!r}"
        if "label" not in r:
            raise InputError(f"label of {place}", "a \"label\" (0/1 list or class index)", got="none")
        labels = _datalist_labels(r["label"], len(names), uncertain, path, place)[sel]
        img = it.get("image")
        if not isinstance(img, str):
            raise InputError(f"image of {place}", "one image path", got=repr(img)[:80])
        image = images(img, place)
        pid = next((str(r[k]) for k in ("patient", "patient_id", "PatientID", "subject") if r.get(k) is not None),
                   None)
        text = r.get(text_column) if text_column is not None else ""
        out.append(LabelRow(image, labels, pid or patient_of(img), "" if text is None else str(text), i))
    images.check()
    return LabelTable(tuple(names[k] for k in sel), tuple(out), path, "datalist")


def _attach_boxes(table: LabelTable, path: Path, root: Path | None) -> LabelTable:
    """Boxes from ``path`` onto the rows of their images (boxes of other images are left out)."""
    def find(name: str) -> str | None:
        return resolve(name, root, table.source or path, table.layout)[0]

    by_image = read_boxes(path, find)
    rows = tuple(replace(r, boxes=tuple(by_image.get(r.image, ()))) for r in table.rows)
    return replace(table, rows=rows)
