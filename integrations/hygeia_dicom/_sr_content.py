"""The TID 1500 content tree of Hygeia's SR with highdicom's templates: procedure reported,
observation context, algorithm identification, one measurement group per image and finding,
input checks. :func:`hygeia_dicom.sr.build_sr_highdicom` builds the whole tree from these;
:mod:`hygeia_dicom._sr_fast` encodes the same tree directly and reuses the checks, procedure
codes, region scaling, observation context and TID 4019 items. The public entry points live in
:mod:`hygeia_dicom.sr`.

Per image and finding, one measurement group:

TID 1501 (Measurement and Qualitative Evaluation Group) referencing the source image (IMAGE
"Source of Measurement"). A located finding's probability (TID 300) is inferred from its region:
INFERRED FROM SCOORD "Source" (TID 320), selected from the source image. (This is how dcmjs and
OHIF encode a located measurement; a TID 1410 group per located finding would make pixelmed
check every group of a one-region report against TID 1410, see docs/dicom.md.)

Each group carries a TID 4108 tracking identifier and UID, the Finding (DCM 121071) as the finding's
code, TID 4019 algorithm identification, the probability (NUM) and the call (Present/Absent).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from hygeia.api import Diagnosis, Finding, Region
from hygeia.errors import InputError

# CID 100 "Quantitative Diagnostic Imaging Procedures" by the source's Modality. These codes are
# in CID 100 both as pydicom/highdicom ship it and in the edition pixelmed validates against;
# CID 100 has no code for (chest) radiography in that edition (LOINC 43468-8 "XR unspecified body
# region" came later), so projection radiography reports the generic SCT 363679005.
_IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")
_PROCEDURE_BY_MODALITY: dict[str, tuple[str, str, str]] = {
    "CT": ("25045-6", "LN", "CT unspecified body region"),
    "MR": ("25056-3", "LN", "MRI unspecified body region"),
    "NM": ("49118-3", "LN", "NM unspecified body region"),
    "PT": ("44136-0", "LN", "PET unspecified body region"),
}
_CID100 = {(c.value, c.scheme_designator) for c in (getattr(codes.cid100, k) for k in codes.cid100.dir())}

_UNIT_NONE = CodedConcept("1", "UCUM", "no units")
_PRESENT = CodedConcept.from_code(codes.SCT.Present)
_ABSENT = CodedConcept.from_code(codes.SCT.Absent)
_PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
_AI_FAMILY = CodedConcept.from_code(codes.cid7162.ArtificialIntelligence)


def procedure_codes(ds: Any) -> list[CodedConcept]:
    """Procedure reported (TID 1500 row 4, CID 100) for a source image.

    The source's Procedure Code Sequence (or Requested Procedure Code Sequence) entries that are
    members of CID 100; else the CID 100 code for its Modality; else SCT 363679005.
    """
    for kw in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        out = []
        for item in getattr(ds, kw, None) or []:
            value, scheme = item.get("CodeValue"), item.get("CodingSchemeDesignator")
            if (value, scheme) in _CID100 and item.get("CodeMeaning"):
                out.append(CodedConcept(value, scheme, item.CodeMeaning))
        if out:
            return out
    value, scheme, meaning = _PROCEDURE_BY_MODALITY.get(str(getattr(ds, "Modality", "")), _IMAGING_PROCEDURE)
    return [CodedConcept(value, scheme, meaning)]


def check_diagnosis(d: Any, i: int) -> None:
    """InputError (one line, naming the item) for a diagnosis the SR cannot represent faithfully."""
    if not isinstance(d, Diagnosis):
        raise InputError(f"diagnoses[{i}]", "a hygeia.api.Diagnosis", got=type(d).__name__)
    if not d.findings:
        raise InputError(f"diagnoses[{i}]", "at least one finding", got="an empty findings list")
    size = tuple(d.image_size) if isinstance(d.image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        raise InputError(f"diagnoses[{i}].image_size", "(rows, columns) of the diagnosed image, both > 0",
                         got=repr(d.image_size))
    for j, f in enumerate(d.findings):
        _check_finding(f, f"diagnoses[{i}].findings[{j}]")


def _check_finding(f: Any, where: str) -> None:
    if not isinstance(f, Finding):
        raise InputError(where, "a hygeia.api.Finding", got=type(f).__name__)
    if not (isinstance(f.label, str) and f.label.strip() and f.label.isprintable()):
        raise InputError(f"{where}.label", "a non-empty label of printable characters", got=repr(f.label)[:80])
    c = f.code
    for part, limit in (("value", 64), ("scheme", 16), ("meaning", 64)):
        v = getattr(c, part, None)
        if not (isinstance(v, str) and v.strip() and len(v) <= limit):
            raise InputError(f"{where}.code.{part} ({f.label})", f"a non-empty string of at most {limit} characters "
                             "(a coded concept, e.g. SCT 60046008 'Pleural effusion')", got=repr(v)[:80])
    for name in ("probability", "threshold"):
        v = getattr(f, name)
        if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)) and 0 <= v <= 1):
            raise InputError(f"{where}.{name} ({f.label})", "a number in [0, 1]", got=repr(v)[:80])
    if f.region is not None and not isinstance(f.region, Region):
        raise InputError(f"{where}.region ({f.label})", "a hygeia.api.Region or None", got=type(f.region).__name__)
    if f.region is not None and not np.all(np.isfinite(np.asarray(f.region.coords, dtype=np.float64))):
        raise InputError(f"{where}.region ({f.label})", "finite (x, y) coordinates", got=repr(f.region.coords)[:80])


def scale_region(finding: Finding, image_size: tuple[int, int], rows: int,
                 columns: int) -> tuple[str, np.ndarray] | None:
    """The finding's region as (graphic type, ``[N, 2]`` (column, row) data) in the source pixels.

    ``image_size`` is (rows, columns) of the image the model saw; coordinates scale by
    ``columns / image_columns`` and ``rows / image_rows`` (DICOM's convention: (0, 0) is the
    top-left corner of the top-left pixel, so a pure scale maps corners onto corners) and are
    clipped to the image. A box becomes a closed POLYLINE of 5 points.
    """
    r = finding.region
    if r is None:
        return None
    sy, sx = rows / float(image_size[0]), columns / float(image_size[1])
    xy = np.asarray(r.coords, dtype=np.float64) * np.array([sx, sy])
    xy[:, 0] = np.clip(xy[:, 0], 0.0, float(columns))
    xy[:, 1] = np.clip(xy[:, 1], 0.0, float(rows))
    if r.kind == "point":
        return "POINT", xy.astype(np.float32)
    if r.kind == "box":
        (x0, y0), (x1, y1) = xy
        xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    return "POLYLINE", xy.astype(np.float32)


def algorithm_identification(model: Any, image_size: tuple[int, int], threshold: float) -> Any:
    """TID 4019 for ``model``: name, version, family AI, parameters (weights SHA-256, input size,
    threshold). No Algorithm Manufacturer: the device observer and the Contributing Equipment
    Sequence already name Hygeia (and older TID 4019 editions have no such row)."""
    params = [f"weights_sha256={model.weights_sha256 or 'none'}", f"input_size={image_size[0]}x{image_size[1]}",
              f"threshold={float(threshold):g}"]
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=params, family=_AI_FAMILY)


def device_uid(model: Any) -> str:
    """A stable Device Observer UID for a model (same name, version and weights -> same UID)."""
    return str(generate_uid(entropy_srcs=["hygeia-device", model.name, model.version, model.weights_sha256 or ""]))


def observation_context(model: Any, manufacturer: str) -> Any:
    """TID 1001 with a TID 1004 device observer: the model (stable UID, name, model name)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model), name=model.name, manufacturer_name=manufacturer,
            model_name=f"{model.name} {model.version}"[:64]))
    return hd.sr.ObservationContext(observer_device_context=observer)


def measurement_group(f: Finding, ds: Any, scaled: tuple[str, np.ndarray] | None, identifier: str,
                      algorithm: Any) -> Any:
    """One TID 1501 group for finding ``f`` of image ``ds``; with a region (``scaled``), the
    probability is inferred from it."""
    concept = CodedConcept(f.code.value, f.code.scheme, f.code.meaning)
    coordinates = None
    if scaled is not None:
        gtype, data = scaled
        coordinates = [hd.sr.CoordinatesForMeasurement(
            graphic_type=gtype, graphic_data=data,
            source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID))]
    probability = hd.sr.Measurement(name=_PROBABILITY, value=round(float(f.probability), 6), unit=_UNIT_NONE,
                                    referenced_coordinates=coordinates)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)],
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=identifier),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=_PRESENT if f.present else _ABSENT)],
    )


def measurement_groups(diagnoses: Sequence[Diagnosis], sources: Sequence[Any]) -> list[Any]:
    """Every group of the report, in diagnosis then finding order; identifiers ``"<label> #<n>"``
    numbered across the report (so they are unique in it)."""
    groups: list[Any] = []
    for d, ds in zip(diagnoses, sources):
        rows, columns = int(ds.Rows), int(ds.Columns)
        for f in d.findings:
            identifier = f"{f.label} #{len(groups) + 1}"
            groups.append(measurement_group(f, ds, scale_region(f, d.image_size, rows, columns), identifier,
                                            algorithm_identification(d.model, d.image_size, f.threshold)))
    return groups
