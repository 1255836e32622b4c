"""The content tree of Hygeia's TID 1500 SR, encoded straight to bytes (see :mod:`._sr_encode`).

The items are the ones :mod:`._sr_content` builds with highdicom's templates, in the same order
with the same values (``tests/test_sr_encoding.py`` checks both give the same dataset):

* per report, built with highdicom and encoded here: language and observation context (cached
  per model), the image library (TID 1600, from the sources);
* per group, written here: tracking identifier and UID, finding, algorithm identification
  (highdicom's TID 4019 items, cached per model, input size and threshold), probability,
  Present/Absent and the source image (TID 1501); a located finding's probability is inferred
  from its region (TID 300 row 9 / TID 320: SCOORD "Source", selected from the source image).

Code sequences and other constant elements are encoded once and cached.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DS

from hygeia.api import Diagnosis, Finding

from . import _sr_content
from . import _sr_encode as enc
from ._sr_encode import (
    CONCEPT_CODE,
    CONCEPT_NAME,
    CONTENT_SEQUENCE,
    CONTINUITY,
    MEASURED_VALUE_SEQUENCE,
    REFERENCED_SOP_SEQUENCE,
    RELATIONSHIP_TYPE,
    TEMPLATE_SEQUENCE,
    TEXT_VALUE,
    UID,
    VALUE_TYPE,
    Encodings,
)

Code = tuple[str, str, str]  # value, scheme designator, meaning


class _Model(NamedTuple):
    """What the cached items need of a ``ModelIdentity`` (hashable, whatever the model object is)."""

    name: str
    version: str
    weights_sha256: str | None


def _model(d: Diagnosis) -> _Model:
    m = d.model
    return _Model(m.name, m.version, m.weights_sha256)


_TRACKING_IDENTIFIER: Code = ("112039", "DCM", "Tracking Identifier")
_TRACKING_UID: Code = ("112040", "DCM", "Tracking Unique Identifier")
_FINDING: Code = ("121071", "DCM", "Finding")
_PROBABILITY: Code = ("122157", "DCM", "Probability")
_NO_UNITS: Code = ("1", "UCUM", "no units")
_PRESENT: Code = ("52101004", "SCT", "Present")
_ABSENT: Code = ("272519000", "SCT", "Absent")
_SOURCE: Code = ("260753009", "SCT", "Source")
_SOURCE_OF_MEASUREMENT: Code = ("121112", "DCM", "Source of Measurement")
_MEASUREMENT_GROUP: Code = ("125007", "DCM", "Measurement Group")
_IMAGING_MEASUREMENTS: Code = ("126010", "DCM", "Imaging Measurements")
_PROCEDURE_REPORTED: Code = ("121058", "DCM", "Procedure reported")

_MAPPING_RESOURCE, _TEMPLATE_IDENTIFIER = 0x00080105, 0x0040DB00
_REFERENCED_SOP_CLASS, _REFERENCED_SOP_INSTANCE = 0x00081150, 0x00081155
_UNITS, _FLOAT_VALUE, _NUMERIC_VALUE = 0x004008EA, 0x0040A161, 0x0040A30A
_GRAPHIC_DATA, _GRAPHIC_TYPE = 0x00700022, 0x00700023


def root_container() -> Any:
    """The document's root content item without children: the SR header takes its concept name,
    template (TID 1500) and continuity from it; the children are :func:`content_sequence`."""
    item = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    item.ContentSequence = hd.sr.ContentSequence()
    return item


@lru_cache(maxsize=4096)
def code_sequence(tag: int, value: str, scheme: str, meaning: str, encodings: Encodings) -> bytes:
    """A one-item code sequence, as highdicom's ``CodedConcept`` writes it (Code Value, or Long
    Code Value / URN Code Value beyond 16 characters)."""
    return enc.sequence(tag, [enc.dataset_item(CodedConcept(value, scheme, meaning), encodings)])


def content_item(relationship: str | None, value_type: str, name: Code, encodings: Encodings,
                 *elements: tuple[int, bytes]) -> bytes:
    """One content item: relationship, value type, concept name and the value's elements."""
    out = [(VALUE_TYPE, enc.cs(VALUE_TYPE, value_type)), (CONCEPT_NAME, code_sequence(CONCEPT_NAME, *name, encodings)),
           *elements]
    if relationship is not None:
        out.append((RELATIONSHIP_TYPE, enc.cs(RELATIONSHIP_TYPE, relationship)))
    return enc.item(out)


def _code_item(relationship: str, name: Code, value: Code, encodings: Encodings) -> bytes:
    return content_item(relationship, "CODE", name, encodings,
                        (CONCEPT_CODE, code_sequence(CONCEPT_CODE, *value, encodings)))


def _num_item(name: Code, value: float, unit: Code, encodings: Encodings, *children: bytes) -> bytes:
    """A NUM item; ``children``: its encoded content items (INFERRED FROM ...)."""
    ds = DS(value, auto_format=True)
    number = ds.original_string if hasattr(ds, "original_string") else str(ds)
    measured = enc.item([(_UNITS, code_sequence(_UNITS, *unit, encodings)),
                         (_FLOAT_VALUE, enc.element(_FLOAT_VALUE, "FD", struct.pack("<d", value))),
                         (_NUMERIC_VALUE, enc.text(_NUMERIC_VALUE, "DS", number, encodings))])
    elements = [(MEASURED_VALUE_SEQUENCE, enc.sequence(MEASURED_VALUE_SEQUENCE, [measured]))]
    if children:
        elements.append((CONTENT_SEQUENCE, enc.sequence(CONTENT_SEQUENCE, list(children))))
    return content_item("CONTAINS", "NUM", name, encodings, *elements)


def _sop_reference(ds: Any) -> tuple[int, bytes]:
    ref = enc.item([(_REFERENCED_SOP_CLASS, enc.text(_REFERENCED_SOP_CLASS, "UI", str(ds.SOPClassUID), ())),
                    (_REFERENCED_SOP_INSTANCE, enc.text(_REFERENCED_SOP_INSTANCE, "UI", str(ds.SOPInstanceUID), ()))])
    return REFERENCED_SOP_SEQUENCE, enc.sequence(REFERENCED_SOP_SEQUENCE, [ref])


@lru_cache(maxsize=16)
def _template(template_id: str) -> bytes:
    ref = enc.item([(_MAPPING_RESOURCE, enc.cs(_MAPPING_RESOURCE, "DCMR")),
                    (_TEMPLATE_IDENTIFIER, enc.cs(_TEMPLATE_IDENTIFIER, template_id))])
    return enc.sequence(TEMPLATE_SEQUENCE, [ref])


@lru_cache(maxsize=256)
def _algorithm(model: _Model, image_size: tuple[int, int], threshold: float, encodings: Encodings) -> tuple[bytes, ...]:
    """TID 4019 items (highdicom's), encoded once per model, input size and threshold."""
    return tuple(enc.dataset_item(i, encodings)
                 for i in _sr_content.algorithm_identification(model, image_size, threshold))


@lru_cache(maxsize=64)
def _context(model: _Model, manufacturer: str, encodings: Encodings) -> tuple[bytes, ...]:
    """Language (TID 1204) and observation context (TID 1001/1004) items, encoded once per model."""
    items = [*hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
             *_sr_content.observation_context(model, manufacturer)]
    return tuple(enc.dataset_item(i, encodings) for i in items)


def measurement_group(f: Finding, d: Diagnosis, ds: Any, identifier: str, encodings: Encodings) -> bytes:
    """One TID 1501 group, as :func:`hygeia_dicom._sr_content.measurement_group` builds it (the
    probability inferred from the region when the finding has one)."""
    finding: Code = (f.code.value, f.code.scheme, f.code.meaning)
    region: list[bytes] = []
    scaled = _sr_content.scale_region(f, d.image_size, int(ds.Rows), int(ds.Columns))
    if scaled is not None:
        gtype, data = scaled
        source = content_item("SELECTED FROM", "IMAGE", _SOURCE, encodings, _sop_reference(ds))
        region.append(content_item(
            "INFERRED FROM", "SCOORD", _SOURCE, encodings,
            (CONTENT_SEQUENCE, enc.sequence(CONTENT_SEQUENCE, [source])),
            (_GRAPHIC_DATA, enc.element(_GRAPHIC_DATA, "FL", np.ascontiguousarray(data, "<f4").tobytes())),
            (_GRAPHIC_TYPE, enc.cs(_GRAPHIC_TYPE, gtype))))
    children = [
        content_item("HAS OBS CONTEXT", "TEXT", _TRACKING_IDENTIFIER, encodings,
                     (TEXT_VALUE, enc.text(TEXT_VALUE, "UT", identifier, encodings))),
        content_item("HAS OBS CONTEXT", "UIDREF", _TRACKING_UID, encodings,
                     (UID, enc.text(UID, "UI", str(generate_uid()), ()))),
        _code_item("CONTAINS", _FINDING, finding, encodings),
        *_algorithm(_model(d), (int(d.image_size[0]), int(d.image_size[1])), float(f.threshold), encodings),
        _num_item(_PROBABILITY, round(float(f.probability), 6), _NO_UNITS, encodings, *region),
        _code_item("CONTAINS", finding, _PRESENT if f.present else _ABSENT, encodings),
        content_item("CONTAINS", "IMAGE", _SOURCE_OF_MEASUREMENT, encodings, _sop_reference(ds)),
    ]
    return content_item("CONTAINS", "CONTAINER", _MEASUREMENT_GROUP, encodings,
                        (CONTINUITY, enc.cs(CONTINUITY, "CONTINUOUS")),
                        (TEMPLATE_SEQUENCE, _template("1501")),
                        (CONTENT_SEQUENCE, enc.sequence(CONTENT_SEQUENCE, children)))


def content_sequence(diagnoses: Sequence[Diagnosis], sources: Sequence[Any], manufacturer: str,
                     encodings: Encodings) -> list[bytes]:
    """The root container's children, encoded: language, observation context, procedure
    reported, image library, and the Imaging Measurements container with one group per image
    and finding (identifiers ``"<label> #<n>"`` numbered across the report)."""
    items = list(_context(_model(diagnoses[0]), manufacturer, encodings))
    items += [_code_item("HAS CONCEPT MOD", _PROCEDURE_REPORTED,
                         (c.value, c.scheme_designator, c.meaning), encodings)
              for c in _sr_content.procedure_codes(sources[0])]
    items += [enc.dataset_item(i, encodings) for i in hd.sr.ImageLibrary(list(sources))]
    groups: list[bytes] = []
    for d, ds in zip(diagnoses, sources):
        for f in d.findings:
            groups.append(measurement_group(f, d, ds, f"{f.label} #{len(groups) + 1}", encodings))
    items.append(content_item("CONTAINS", "CONTAINER", _IMAGING_MEASUREMENTS, encodings,
                              (CONTINUITY, enc.cs(CONTINUITY, "CONTINUOUS")),
                              (CONTENT_SEQUENCE, enc.sequence(CONTENT_SEQUENCE, groups))))
    return items
