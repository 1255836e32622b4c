"""Diagnoses -> DICOM Comprehensive 3D SR following TID 1500 (Measurement Report), via highdicom.

Structure of one report (one per study; several source images may share it)::

    Imaging Measurement Report (TID 1500)
      Language, Observation context: device observer (TID 1004) = the diagnoser model
      Procedure reported: from the source study (Procedure Code Sequence), else from its modality
      Image library (TID 1600): every source image
      Imaging measurements
        Measurement group (TID 1410 with a region, TID 1501 without) per image and finding:
          Tracking identifier "<label> #<n>" + tracking UID (TID 4108)
          Finding type: the finding's SNOMED CT code (hygeia.vocab)
          Algorithm identification (TID 4019): model name, version, weights SHA-256, threshold
          Image region: SCOORD POINT/POLYLINE in the source image's pixels (when the model gave one)
          Probability: NUM (DCM 122157 "Probability"), UCUM "1" (no units), value in [0, 1]
          Qualitative evaluation: <finding> = Present / Absent (SNOMED CT), at the stated threshold

The SR is written to a new series in the source study, marked not verified (VerificationFlag
UNVERIFIED) and partial/complete as requested, with a Contributing Equipment Sequence naming
Hygeia and the model as processing equipment.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hygeia.api import Diagnosis, Finding
from hygeia.errors import InputError

MANUFACTURER = "Hygeia"
SERIES_DESCRIPTION = "Hygeia AI findings - NOT VERIFIED"

# Procedure reported when the source study carries no Procedure Code Sequence (SNOMED CT).
_PROCEDURE_BY_MODALITY: dict[str, tuple[str, str]] = {
    "CT": ("77477000", "Computerized axial tomography"),
    "MR": ("113091000", "Magnetic resonance imaging"),
    "CR": ("363680008", "Radiographic imaging procedure"),
    "DX": ("363680008", "Radiographic imaging procedure"),
    "MG": ("71651007", "Mammography"),
    "US": ("16310003", "Ultrasonography"),
}


def read_source(source: Any, index: int = 0) -> Any:
    """A pydicom Dataset for ``source`` (a Dataset, or a path to a DICOM file)."""
    import pydicom

    if isinstance(source, pydicom.Dataset):
        ds = source
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"sources[{index}] {str(p)!r}", "the source DICOM image of the diagnosis "
                             "(an SR needs a patient and study to belong to)",
                             got=f"{type(exc).__name__}: {exc}"[:200]) from None
    else:
        raise InputError(f"sources[{index}]", "a pydicom Dataset or the path of a DICOM file",
                         got=type(source).__name__)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if kw not in ds:
            raise InputError(f"sources[{index}]", f"a DICOM image with {kw}", got=f"no {kw}")
    return ds


def _procedure_codes(ds: Any) -> list[Any]:
    from highdicom.sr import CodedConcept

    for kw in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        seq = getattr(ds, kw, None)
        if seq:
            out = []
            for item in seq:
                if all(k in item for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")):
                    out.append(CodedConcept(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning))
            if out:
                return out
    value, meaning = _PROCEDURE_BY_MODALITY.get(str(getattr(ds, "Modality", "")), ("363679005", "Imaging procedure"))
    return [CodedConcept(value, "SCT", meaning)]


def device_uid(diagnosis: Diagnosis) -> str:
    """A stable Device Observer UID for a model (same name, version and weights -> same UID)."""
    from pydicom.uid import generate_uid

    m = diagnosis.model
    return str(generate_uid(entropy_srcs=["hygeia-device", m.name, m.version, m.weights_sha256 or ""]))


def scale_region(finding: Finding, image_size: tuple[int, int], rows: int, columns: int) -> tuple[str, np.ndarray] | None:
    """The finding's region as (graphic type, ``[N, 2]`` (column, row) data) in the source pixels.

    ``image_size`` is (rows, columns) of the image the model saw; coordinates scale by
    ``columns / image_columns`` and ``rows / image_rows`` (DICOM's convention: (0, 0) is the
    top-left corner of the top-left pixel, so a pure scale maps corners onto corners).
    A box becomes a closed POLYLINE of 5 points.
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


def build_measurement_report(diagnoses: Sequence[Diagnosis], sources: Sequence[Any]) -> Any:
    """The TID 1500 content tree (a highdicom ``MeasurementReport``) for one study."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    first = diagnoses[0]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(first), name=first.model.name, manufacturer_name=MANUFACTURER,
            model_name=f"{first.model.name} {first.model.version}"[:64]),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    groups: list[Any] = []
    unit = CodedConcept("1", "UCUM", "no units")
    for d, ds in zip(diagnoses, sources):
        params = [f"weights_sha256={d.model.weights_sha256 or 'none'}",
                  f"input_size={d.image_size[0]}x{d.image_size[1]}"]
        for n, f in enumerate(d.findings, start=1):
            algo = hd.sr.AlgorithmIdentification(
                name=d.model.name, version=d.model.version, manufacturer=MANUFACTURER,
                parameters=[*params, f"threshold={f.threshold:g}"],
                family=codes.cid7162.ArtificialIntelligence)
            concept = CodedConcept(f.code.value, f.code.scheme, f.code.meaning)
            tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{f.label} #{n}")
            prob = hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(np.clip(f.probability, 0.0, 1.0)), 6),
                                     unit=unit)
            evaluation = hd.sr.QualitativeEvaluation(
                name=concept, value=codes.SCT.Present if f.present else codes.SCT.Absent)
            common = dict(tracking_identifier=tracking, finding_type=concept, algorithm_id=algo,
                          measurements=[prob], qualitative_evaluations=[evaluation])
            scaled = scale_region(f, d.image_size, int(ds.Rows), int(ds.Columns))
            if scaled is not None:
                gtype, data = scaled
                region = hd.sr.ImageRegion(
                    graphic_type=gtype, graphic_data=data,
                    source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID))
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=region, **common))
            else:
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                    source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)],
                    **common))
    return hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_procedure_codes(sources[0]),
        imaging_measurements=groups,
        referenced_images=list(sources),
    )


def build_sr(
    diagnoses: Sequence[Diagnosis],
    sources: Sequence[Any],
    *,
    series_number: int = 9001,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    institution_name: str | None = None,
) -> Any:
    """A ``highdicom.sr.Comprehensive3DSR`` for diagnoses of images of one study.

    ``sources``: one pydicom Dataset (or DICOM path) per diagnosis, all of the same study.
    The report goes into a new series (``series_instance_uid`` or a fresh UID) of that study.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import hygeia

    diagnoses = list(diagnoses)
    if not diagnoses:
        raise InputError("diagnoses", "at least one Diagnosis", got="none")
    for i, d in enumerate(diagnoses):
        if not isinstance(d, Diagnosis):
            raise InputError(f"diagnoses[{i}]", "a hygeia.api.Diagnosis", got=type(d).__name__)
        if not d.findings:
            raise InputError(f"diagnoses[{i}]", "at least one finding", got="an empty findings list")
    if sources is None or len(sources) != len(diagnoses):
        raise InputError("sources", f"one source DICOM image per diagnosis ({len(diagnoses)})",
                         got="none" if sources is None else f"{len(sources)}")
    datasets = [read_source(s, i) for i, s in enumerate(sources)]
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(studies) != 1:
        raise InputError("sources", "images of one study (one SR per study)", got=f"{len(studies)} studies")
    # highdicom copies patient/study attributes from the evidence; pixels are not needed.
    evidence = [_header_only(ds) for ds in datasets]
    report = build_measurement_report(diagnoses, evidence)
    m = diagnoses[0].model
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=m.name[:64], software_versions=[f"hygeia {hygeia.__version__}", f"{m.name} {m.version}"],
        contribution_datetime=datetime.datetime.now(),
        contribution_description=f"AI findings by {m.name} {m.version} (weights sha256 {m.weights_sha256 or 'none'})"[:1024])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=m.name[:64],
        software_versions=f"hygeia {hygeia.__version__}",
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[equipment],
    )
    return sr


_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _header_only(ds: Any) -> Any:
    """A shallow copy of ``ds`` without bulk pixel data (evidence needs only the header).

    Patient and study attributes of type 2 that the source lacks (modalities often omit them)
    are added empty in the copy, as PS3.3 allows for type 2; the source is not changed.
    """
    import pydicom

    out = pydicom.Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            out.add(elem)
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, None)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def write_dataset(ds: Any, path: str | os.PathLike[str]) -> Path:
    """Write a DICOM dataset as a PS3.10 file, atomically (temp file + os.replace)."""
    from hygeia.outputs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_sr(diagnoses: Sequence[Diagnosis], out: str | os.PathLike[str], sources: Sequence[Any] | None = None,
             **options: Any) -> list[Path]:
    """Output-format entry point ``sr``: one SR file at ``out`` for diagnoses of one study."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"SR output {str(out)!r}", "a file path (e.g. report.dcm)", got="a directory")
    sr = build_sr(diagnoses, sources if sources is not None else [], **options)
    return [write_dataset(sr, out)]
