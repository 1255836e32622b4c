"""``build_sr`` encodes the SR content tree itself (``hygeia_dicom._sr_fast``); these tests hold it
to the same dataset that highdicom's templates build (``build_sr_highdicom``): every SR variant,
other character sets, long code values, another transfer syntax, and the speed it exists for.
The validators (dciodvfy, dsrdump, dsr2html, pixelmed, highdicom read-back) run on ``build_sr``'s
files in ``tests/test_dicom_sr.py`` and ``tests/test_sr_conformance.py``.
"""
from __future__ import annotations

import io
import statistics
import time

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from hygeia.api import Diagnosis
from hygeia.vocab import Code

from test_dicom_sr import BOX, IMAGE_SIZE, MODEL, POINT, _content_json, _f, _walk, variant_findings


def _sources(tmp_path, name: str, n: int, seed: int) -> list[pydicom.Dataset]:
    from hygeia_lab import write_phantom_study

    return [pydicom.dcmread(p) for p in write_phantom_study(tmp_path / name, n=n, seed=seed)]


def _both(diagnoses, sources) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """build_sr and build_sr_highdicom of the same input and UIDs, each written and read back."""
    from hygeia_dicom.sr import build_sr, build_sr_highdicom

    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    return (_round_trip(build_sr(diagnoses, sources, **uids)),
            _round_trip(build_sr_highdicom(diagnoses, sources, **uids)))


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _uidrefs(ds: pydicom.Dataset, concept: str) -> list[str]:
    return [i.UID for i in _walk(ds.ContentSequence)
            if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == concept]


def _assert_same_report(fast: pydicom.Dataset, reference: pydicom.Dataset, groups: int) -> None:
    # everything equal but dates, times and content-item UIDs (new tracking UIDs on every build) ...
    assert _content_json(fast) == _content_json(reference)
    # ... and of those, the device observer UID is stable; tracking UIDs are one per group, distinct
    assert _uidrefs(fast, "121012") == _uidrefs(reference, "121012") and len(_uidrefs(fast, "121012")) == 1
    assert len(set(_uidrefs(fast, "112040"))) == groups
    assert fast.file_meta.TransferSyntaxUID == reference.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", list(variant_findings()))
def test_build_sr_equals_highdicom_templates(tmp_path, name):
    per_image = variant_findings()[name]
    sources = _sources(tmp_path, name, len(per_image), seed=70)
    diagnoses = [Diagnosis(fs, MODEL, IMAGE_SIZE) for fs in per_image]
    fast, reference = _both(diagnoses, sources)
    _assert_same_report(fast, reference, sum(len(fs) for fs in per_image))


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_character_sets_and_long_codes(tmp_path, charset):
    """Text in the source's Specific Character Set (or pydicom's default), a user label outside
    ASCII, and a code value longer than 16 characters (highdicom writes it as Long Code Value)."""
    (src,) = _sources(tmp_path, "charset", 1, seed=3)
    if charset is None:
        del src.SpecificCharacterSet
    else:
        src.SpecificCharacterSet = charset
    local = Code("HYG-EFFUSION-LEFT-2026", "99HYG", "Épanchement pleural gauche")
    findings = [_f("épanchement", 0.7, BOX, local), _f("nodule", 0.4, POINT), _f("effusion", 0.2)]
    fast, reference = _both([Diagnosis(findings, MODEL, IMAGE_SIZE)], [src])
    _assert_same_report(fast, reference, 3)
    codes = [c for i in _walk(fast.ContentSequence) for c in getattr(i, "ConceptCodeSequence", [])]
    assert any(c.get("LongCodeValue") == local.value for c in codes)
    if charset is not None:  # ASCII cannot hold the label: pydicom's default encoding is kept
        assert any(getattr(i, "TextValue", "") == "épanchement #1" for i in _walk(fast.ContentSequence))


def test_raw_content_is_parsed_on_access_and_re_encoded_for_another_syntax(tmp_path):
    from hygeia_dicom.sr import build_sr

    per_image = variant_findings()["regions"]
    sources = _sources(tmp_path, "syntax", 1, seed=8)
    sr = build_sr([Diagnosis(per_image[0], MODEL, IMAGE_SIZE)], sources)
    # what the gateway counts: the items of the Imaging Measurements container
    assert sum(1 for _ in sr.ContentSequence[-1].ContentSequence) == len(per_image[0])
    explicit = _round_trip(sr)
    sr.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = _round_trip(sr)
    assert implicit.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert implicit.to_json_dict() == explicit.to_json_dict()


def test_build_sr_is_several_times_faster_than_highdicom_templates(tmp_path):
    """The point of encoding the tree directly (benchmarks/dicom.py measures it against a bare
    highdicom build: about 12 vs 75 ms per image on one core). Interleaved, so load hits both."""
    from hygeia_dicom.sr import build_sr, build_sr_highdicom

    sources = _sources(tmp_path, "speed", 1, seed=11)
    diagnoses = [Diagnosis(variant_findings()["regions"][0], MODEL, IMAGE_SIZE)]
    fast, slow = [], []
    for _ in range(6):
        t0 = time.perf_counter()
        _round_trip(build_sr(diagnoses, sources))
        t1 = time.perf_counter()
        _round_trip(build_sr_highdicom(diagnoses, sources))
        fast.append(t1 - t0)
        slow.append(time.perf_counter() - t1)
    assert statistics.median(fast) * 2.5 < statistics.median(slow), (fast, slow)
