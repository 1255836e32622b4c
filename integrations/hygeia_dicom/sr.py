"""Diagnoses -> DICOM Comprehensive 3D SR following TID 1500 (Measurement Report).

Structure of one report (one per study; several source images may share it)::

    Imaging Measurement Report (TID 1500)
      Language, Observation context: device observer (TID 1004) = the diagnoser model
      Procedure reported: CID 100 (the source's procedure code if in CID 100, else by Modality)
      Image library (TID 1600): every source image
      Imaging measurements: one measurement group per image and finding
        TID 1501 (Measurement and Qualitative Evaluation Group):
          Tracking identifier "<label> #<n>" + tracking UID (TID 4108)
          Finding (DCM 121071): the finding's code (SNOMED CT for the built-in five)
          Algorithm identification (TID 4019): model name, version, family AI, parameters
            (weights SHA-256, input size, threshold)
          Source of Measurement, IMAGE = the source image
          Probability: NUM (DCM 122157 "Probability"), UCUM "1" (no units), value in [0, 1]
            (a located finding) INFERRED FROM SCOORD "Source" (TID 320), POINT/POLYLINE in the
            source image's pixels, SELECTED FROM the source image
          Qualitative evaluation: <finding> = Present / Absent (SNOMED CT), at the stated threshold

The SR is written to a new series in the source study, marked not verified (VerificationFlag
UNVERIFIED) and preliminary, with a Contributing Equipment Sequence naming Hygeia and the
model as processing equipment. highdicom writes the header; the content tree is encoded
directly by :mod:`hygeia_dicom._sr_fast` (several times faster than highdicom's templates,
which :func:`build_sr_highdicom` uses to build the same report from :mod:`hygeia_dicom._sr_content`).
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Sequence

from hygeia.api import Diagnosis
from hygeia.errors import InputError

MANUFACTURER = "Hygeia"
SERIES_DESCRIPTION = "Hygeia AI findings - NOT VERIFIED"


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
                             got=" ".join(f"{type(exc).__name__}: {exc}".split())[:200]) from None
    else:
        raise InputError(f"sources[{index}]", "a pydicom Dataset or the path of a DICOM file",
                         got=type(source).__name__)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if kw not in ds:
            raise InputError(f"sources[{index}]", f"a DICOM image with {kw}", got=f"no {kw}")
    return ds


def build_measurement_report(diagnoses: Sequence[Diagnosis], sources: Sequence[Any]) -> Any:
    """The TID 1500 content tree as a highdicom ``MeasurementReport`` (highdicom's templates; used
    by :func:`build_sr_highdicom`). ``sources``: one pydicom Dataset per diagnosis (headers suffice)."""
    import highdicom as hd

    from . import _sr_content

    return hd.sr.MeasurementReport(
        observation_context=_sr_content.observation_context(diagnoses[0].model, MANUFACTURER),
        procedure_reported=_sr_content.procedure_codes(sources[0]),
        imaging_measurements=_sr_content.measurement_groups(diagnoses, sources),
        referenced_images=list(sources),
    )


def scale_region(finding: Any, image_size: tuple[int, int], rows: int, columns: int) -> Any:
    """The finding's region in the source image's pixels; see :func:`hygeia_dicom._sr_content.scale_region`."""
    from ._sr_content import scale_region as scale

    return scale(finding, image_size, rows, columns)


def build_sr(
    diagnoses: Sequence[Diagnosis],
    sources: Sequence[Any],
    *,
    series_number: int = 9001,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    institution_name: str | None = None,
) -> Any:
    """A Comprehensive 3D SR (a pydicom ``Dataset``) for diagnoses of images of one study.

    ``sources``: one pydicom Dataset (or DICOM path) per diagnosis, all of the same study.
    The report goes into a new series (``series_instance_uid`` or a fresh UID) of that study.
    highdicom writes the header; the content tree is encoded directly
    (:mod:`hygeia_dicom._sr_fast`) and held as one raw Content Sequence element, which
    ``dcmwrite`` copies as is and pydicom parses on first access. Its content equals
    :func:`build_sr_highdicom`'s.
    """
    import pydicom
    from pydicom.charset import convert_encodings, default_encoding

    from . import _sr_encode, _sr_fast

    diagnoses, evidence = _checked_inputs(diagnoses, sources)
    sr = _document(diagnoses, evidence, _sr_fast.root_container(), series_number=series_number,
                   series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                   institution_name=institution_name)
    out = pydicom.Dataset(sr)  # the same elements, without highdicom's parsed copy of the content
    out.file_meta = sr.file_meta
    # text is encoded as pydicom's writer would: the Specific Character Set, else its default
    encodings = tuple(convert_encodings(out.get("SpecificCharacterSet", default_encoding)))
    items = _sr_fast.content_sequence(diagnoses, evidence, MANUFACTURER, encodings)
    out[_sr_encode.CONTENT_SEQUENCE] = _sr_encode.raw_sequence(_sr_encode.CONTENT_SEQUENCE, items)
    # "read as explicit VR little endian in this character set": dcmwrite to that transfer syntax then
    # copies the raw element; to any other, pydicom parses and re-encodes it (slower, same content)
    out.set_original_encoding(False, True, out._character_set)
    return out


def build_sr_highdicom(diagnoses: Sequence[Diagnosis], sources: Sequence[Any], **options: Any) -> Any:
    """The same report as :func:`build_sr`, built entirely with highdicom's templates (a
    ``highdicom.sr.Comprehensive3DSR``; about 4 times slower). Kept as the reference the tests
    compare :func:`build_sr` with."""
    diagnoses, evidence = _checked_inputs(diagnoses, sources)
    return _document(diagnoses, evidence, build_measurement_report(diagnoses, evidence), **options)


def _checked_inputs(diagnoses: Sequence[Diagnosis], sources: Sequence[Any]) -> tuple[list[Diagnosis], list[Any]]:
    """The diagnoses, checked, and one header-only evidence dataset per diagnosis, of one study."""
    from ._sr_content import check_diagnosis

    diagnoses = list(diagnoses)
    if not diagnoses:
        raise InputError("diagnoses", "at least one Diagnosis", got="none")
    for i, d in enumerate(diagnoses):
        check_diagnosis(d, i)
    if sources is None or len(sources) != len(diagnoses):
        raise InputError("sources", f"one source DICOM image per diagnosis ({len(diagnoses)})",
                         got="none" if sources is None else f"{len(sources)}")
    datasets = [read_source(s, i) for i, s in enumerate(sources)]
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(studies) != 1:
        raise InputError("sources", "images of one study (one SR per study)", got=f"{len(studies)} studies")
    # highdicom copies patient/study attributes from the evidence; pixels are not needed.
    return diagnoses, [_header_only(ds) for ds in datasets]


def _document(diagnoses: list[Diagnosis], evidence: list[Any], content: Any, *, series_number: int = 9001,
              series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
              institution_name: str | None = None) -> Any:
    """highdicom's ``Comprehensive3DSR`` for ``content``: header, evidence, equipment, flags."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import hygeia

    m = diagnoses[0].model
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=m.name[:64],
        software_versions=[f"hygeia {hygeia.__version__}", f"{m.name} {m.version}"],
        contribution_datetime=datetime.datetime.now(),
        contribution_description=(f"AI findings by {m.name} {m.version} "
                                  f"(weights sha256 {m.weights_sha256 or 'none'})")[:1024])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
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
