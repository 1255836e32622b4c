"""The finding vocabulary, coded in SNOMED CT. The one place where finding codes live."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

SCT = "SCT"  # DICOM coding scheme designator for SNOMED CT


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value`` in ``scheme`` (DICOM's CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class FindingType:
    """One finding the built-in models know about."""

    label: str  # short machine label, e.g. "effusion"
    code: Code
    synonyms: tuple[str, ...] = ()


FINDINGS: tuple[FindingType, ...] = (
    FindingType("nodule", Code("786838002", SCT, "Pulmonary nodule"), ("lung nodule", "mass")),
    FindingType("consolidation", Code("95436008", SCT, "Lung consolidation"), ("airspace opacity",)),
    FindingType("effusion", Code("60046008", SCT, "Pleural effusion"), ("pleural effusion",)),
    FindingType("cardiomegaly", Code("8186001", SCT, "Cardiomegaly"), ("enlarged heart",)),
    FindingType("pneumothorax", Code("36118008", SCT, "Pneumothorax"), ()),
)
"""The abnormal findings, in the fixed order used by every multi-label tensor ``[B, 5]``."""

NORMAL = FindingType("normal", Code("17621005", SCT, "Normal"), ("no finding",))
"""'Normal': no finding present. Not a channel of the label tensor."""

FINDING_LABELS: tuple[str, ...] = tuple(f.label for f in FINDINGS)
CONDITION_LABELS: tuple[str, ...] = (NORMAL.label, *FINDING_LABELS)
"""Labels a label condition may take: 'normal' plus each finding."""

_BY_LABEL = {f.label: f for f in (NORMAL, *FINDINGS)}
for _f in (NORMAL, *FINDINGS):
    for _s in _f.synonyms:
        _BY_LABEL.setdefault(_s, _f)


def finding(label: str) -> FindingType:
    """Look a finding up by label or synonym (case-insensitive); raise InputError if unknown."""
    key = label.strip().lower() if isinstance(label, str) else label
    try:
        return _BY_LABEL[key]
    except (KeyError, TypeError):
        raise InputError(
            "finding label", f"one of {', '.join(CONDITION_LABELS)}", got=repr(label)
        ) from None


def finding_index(label: str) -> int:
    """Index of a finding in the ``[B, 5]`` label tensor (InputError for 'normal' or unknown)."""
    f = finding(label)
    if f is NORMAL:
        raise InputError("finding label", f"one of {', '.join(FINDING_LABELS)}", got="'normal'")
    return FINDINGS.index(f)

CHEST_FOV_MM = 350.0
"""Field of view (mm) of the chest radiographs the built-in image models read and write: an
image of S pixels a side has a pixel spacing of ``CHEST_FOV_MM / S`` mm."""


def bundle_codes(config: Mapping[str, Any], findings: Sequence[str]) -> dict[str, Code]:
    """The code of each finding a model bundle reports: the bundle config's ``codes`` (a model
    trained on the user's labels, ``{finding: {value, scheme, meaning}}``), else this table's."""
    given = config.get("codes") or {}
    return {f: Code(**given[f]) if f in given else finding(f).code for f in findings}
