"""SNOMED CT codes for the finding names of a user's label file.

:func:`code_for` maps a finding name (a column of a CheXpert-style CSV, a label of a
ChestX-ray14-style CSV, a name of a MONAI datalist) to a :class:`hygeia.vocab.Code`. It looks in
order at:

1. the user's table (``--codes codes.csv``: ``finding,code,scheme,meaning``, read by
   :func:`read_codes`);
2. the finding labels of :mod:`hygeia.vocab` (``nodule``, ``consolidation``, ``effusion``,
   ``cardiomegaly``, ``pneumothorax``, ``normal``), so a name the built-in models know gets the
   code they report;
3. :data:`BUILTIN_CODES`, CheXpert and ChestX-ray14 names whose concept is in the SNOMED CT
   dictionary that pydicom ships (``pydicom.sr.codedict.codes.SCT``).

Names match without regard to case, underscores or repeated spaces (``Pleural_Thickening`` is
``pleural thickening``). A name found nowhere is an InputError listing the known names and
saying to pass ``--codes``.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from .errors import InputError
from .vocab import FINDINGS, NORMAL, SCT, Code

__all__ = ["BUILTIN_CODES", "UserCodes", "code_for", "known_names", "normalize", "read_codes"]

BUILTIN_CODES: dict[str, Code] = {
    "Pleural Effusion": Code("60046008", SCT, "Pleural effusion"),
    "Effusion": Code("60046008", SCT, "Pleural effusion"),
    "Pneumothorax": Code("36118008", SCT, "Pneumothorax"),
    "Edema": Code("19242006", SCT, "Pulmonary edema"),
    "Mass": Code("4147007", SCT, "Mass"),
    "Fibrosis": Code("112674009", SCT, "Fibrosis"),
    "No Finding": Code("17621005", SCT, "Normal"),
}
"""Built-in names -> codes, each checked against pydicom's SNOMED CT dictionary (a test keeps
them there). Names of the two public datasets with no such concept (Atelectasis, Emphysema,
Hernia, Infiltration, Pleural_Thickening, Pleural Other, Pneumonia, Enlarged Cardiomediastinum,
Lung Opacity, Lung Lesion, Fracture, Support Devices) are left to the user's ``--codes`` table;
Cardiomegaly, Consolidation and Nodule take the codes of :mod:`hygeia.vocab`."""

UserCodes = Union[Mapping[str, Code], str, "os.PathLike[str]", None]
"""A user table: a mapping name -> Code (as :func:`read_codes` returns), the path of a codes
CSV, or None."""

_HEADER = ("finding", "code", "scheme", "meaning")


def normalize(name: str) -> str:
    """The matching key of a finding name: lower case, ``_`` as space, single spaces."""
    return " ".join(str(name).replace("_", " ").split()).lower()


def read_codes(path: str | os.PathLike[str]) -> dict[str, Code]:
    """Read a codes CSV, ``finding,code,scheme,meaning`` per row (header optional): the user's
    finding names (as written, in file order) -> codes.

    ``scheme`` defaults to ``SCT`` when blank. Raises InputError naming the file and line for an
    unreadable file, a row without finding or code, or a finding given two different codes.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"codes file {str(path)!r}", "a readable CSV finding,code,scheme,meaning",
                         got=f"{type(exc).__name__}: {exc}"[:300]) from None
    out: dict[str, Code] = {}
    names: dict[str, str] = {}
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row] + [""] * (4 - len(row))
        if not any(cells):
            continue
        if line == 1 and tuple(c.lower() for c in cells[:4]) == _HEADER:
            continue
        finding, value, scheme, meaning = cells[:4]
        where = f"line {line} of codes file {str(path)!r}"
        if not finding or not value:
            raise InputError(where, "finding,code,scheme,meaning with a finding name and a code",
                             got=",".join(row))
        code = Code(value, scheme or SCT, meaning or finding)
        first = names.setdefault(normalize(finding), finding)
        if first in out and out[first] != code:
            raise InputError(where, f"one code per finding ({first!r} is already {out[first].value})",
                             got=f"{finding!r} -> {value}")
        out[first] = code
    if not out:
        raise InputError(f"codes file {str(path)!r}", "at least one row finding,code,scheme,meaning",
                         got="no rows")
    return out


def _user_table(user_codes: UserCodes) -> dict[str, Code]:
    """The user's names (as written) -> codes."""
    if user_codes is None:
        return {}
    if isinstance(user_codes, Mapping):
        return dict(user_codes)
    return read_codes(user_codes)


def _tables(user_codes: UserCodes) -> list[dict[str, Code]]:
    """The tables in lookup order: the user's, the vocabulary's labels, the built-in names."""
    vocab = {f.label: f.code for f in (NORMAL, *FINDINGS)}
    return [_user_table(user_codes), vocab, BUILTIN_CODES]


def known_names(user_codes: UserCodes = None) -> list[str]:
    """Every name :func:`code_for` maps (the user's, the vocabulary's and the built-in ones)."""
    names: dict[str, str] = {}
    for table in _tables(user_codes):
        for name in table:
            names.setdefault(normalize(name), name)
    return sorted(names.values(), key=str.lower)


def code_for(finding: str, user_codes: UserCodes = None) -> Code:
    """The code of ``finding``: the user's table first, then :mod:`hygeia.vocab`, then
    :data:`BUILTIN_CODES`. Raises InputError listing the known names when none maps it."""
    if not isinstance(finding, str) or not finding.strip():
        raise InputError("finding name", "a non-empty string", got=repr(finding))
    key = normalize(finding)
    for table in _tables(user_codes):
        for name, code in table.items():
            if normalize(name) == key:
                return code
    known = ", ".join(known_names(user_codes))
    raise InputError(f"finding {finding!r}", f"a name with a code, one of {known}; for any other name pass "
                     "--codes codes.csv (finding,code,scheme,meaning)", got="no code for it")
