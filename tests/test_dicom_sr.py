"""DICOM outputs: TID 1500 SR from the real ``cnn`` diagnoser on phantom DICOM (synthetic SC: test_dicom_sc.py).

Validated with independent tools: dciodvfy (dicom3tools; no line may start with ``Error``, its
exit code is unreliable), ``dsrdump -v`` (dcmtk; no ``E:`` or ``W:`` lines) and ``dsr2html``
(dcmtk; renders every report), plus the content read back with highdicom (``hd.sr.srread`` and
its accessors). pixelmed's TID 1500 validator runs over the same SR variants in
``tests/test_sr_conformance.py``.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

import hygeia
from hygeia.api import Diagnosis, Finding, ModelIdentity, Region
from hygeia.data.io import load_image, prepare_image
from hygeia.errors import InputError
from hygeia.plugins import get_registry
from hygeia.vocab import Code, finding

pytestmark = pytest.mark.skipif(not (shutil.which("dciodvfy") and shutil.which("dsrdump") and shutil.which("dsr2html")),
                                reason="needs dicom3tools (dciodvfy) and dcmtk (dsrdump, dsr2html)")

# --------------------------------------------------------------------------- SR variants
# Shared with tests/test_sr_conformance.py (pixelmed): findings per image of each report.
MODEL = ModelIdentity("cnn", "1.0.0", "diagnoser", "5" * 64)
IMAGE_SIZE = (64, 64)  # what the model saw; the phantom sources are 128 x 128
POINT = Region("point", ((10.0, 12.0),))
BOX = Region("box", ((5.0, 30.0), (25.0, 60.0)))
POLYLINE = Region("polyline", ((30.0, 30.0), (40.0, 30.0), (40.0, 45.0), (30.0, 30.0)))
ATELECTASIS = Code("46621007", "SCT", "Atelectasis")  # user-trained labels, outside the built-in five
RIB_FRACTURE = Code("33737001", "SCT", "Fracture of rib")
EMPHYSEMA = Code("87433001", "SCT", "Pulmonary emphysema")


def _f(label: str, probability: float, region: Region | None = None, code: Code | None = None,
       threshold: float = 0.5) -> Finding:
    return Finding(label, code or finding(label).code, probability, threshold, region)


def variant_findings() -> dict[str, list[list[Finding]]]:
    """Per SR variant, the findings of each of its images."""
    return {
        "regions": [[_f("nodule", 0.91, POINT), _f("effusion", 0.84, BOX), _f("consolidation", 0.77, POLYLINE),
                     _f("cardiomegaly", 0.12), _f("pneumothorax", 0.03)]],
        "none_present": [[_f("nodule", 0.1), _f("consolidation", 0.2), _f("effusion", 0.05),
                          _f("cardiomegaly", 0.3, threshold=0.6), _f("pneumothorax", 0.01, threshold=0.3)]],
        "every_finding": [[_f("nodule", 0.9, POINT), _f("consolidation", 0.8), _f("effusion", 0.95, BOX),
                           _f("cardiomegaly", 0.7), _f("pneumothorax", 0.88, POLYLINE)]],
        "user_labels": [[_f("atelectasis", 0.81, BOX, ATELECTASIS), _f("rib fracture", 0.64, POINT, RIB_FRACTURE),
                         _f("emphysema", 0.2, None, EMPHYSEMA), _f("nodule", 0.4, threshold=0.35)]],
        "study_of_two": [[_f("nodule", 0.9, POINT), _f("effusion", 0.1)],
                         [_f("effusion", 0.7, BOX), _f("pneumothorax", 0.2)]],
    }


def write_sr_variants(out: Path) -> dict[str, tuple[Path, list[Diagnosis], list[pydicom.Dataset]]]:
    """Write every SR variant under ``out`` from phantom DICOM sources: name -> (SR, diagnoses, sources)."""
    from hygeia_lab import write_phantom_study

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, (name, per_image) in enumerate(variant_findings().items()):
        files = write_phantom_study(out / f"{name}_src", n=len(per_image), seed=70 + k)
        sources = [pydicom.dcmread(f) for f in files]
        diagnoses = [Diagnosis(fs, MODEL, IMAGE_SIZE) for fs in per_image]
        paths = get_registry().output_format("sr").write(diagnoses, out / f"{name}.dcm", sources=sources)
        written[name] = (paths[0], diagnoses, sources)
    return written


@pytest.fixture(scope="module")
def sr_variants(tmp_path_factory):
    return write_sr_variants(tmp_path_factory.mktemp("sr_variants"))


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


def dsrdump_problems(path: Path) -> list[str]:
    out = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("E:", "W:"))]


@pytest.fixture(scope="module")
def cnn():
    return hygeia.create("diagnoser", "cnn")


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from hygeia_lab import write_phantom_dicom

    d = tmp_path_factory.mktemp("phantoms")
    return [Path(write_phantom_dicom(d / f"p{seed}.dcm", seed=seed, finding=f))
            for seed, f in ((11, "effusion"), (12, "nodule"), (13, None))]


def _diagnose(cnn, paths):
    loaded = [load_image(p) for p in paths]
    batch = np.stack([prepare_image(li.pixels, size=cnn.input_size) for li in loaded])
    return loaded, cnn.diagnose(batch)


def test_sr_from_cnn_on_phantom_passes_validators(cnn, phantom_files, tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    loaded, diagnoses = _diagnose(cnn, phantom_files)
    # the report of an image with a located finding, so the SCOORD path is checked too
    k = next((i for i, d in enumerate(diagnoses) if any(f.region is not None for f in d.findings)), None)
    assert k is not None, "expected the cnn to locate a finding in one of the phantoms"
    loaded, diagnoses = loaded[k:k + 1], diagnoses[k:k + 1]
    src = loaded[0].dataset
    out = get_registry().output_format("sr").write(diagnoses, tmp_path / "sr.dcm", sources=[src])
    assert out == [tmp_path / "sr.dcm"]
    assert dciodvfy_errors(out[0]) == []
    assert dsrdump_problems(out[0]) == []

    ds = pydicom.dcmread(out[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID  # a new series of the source study
    assert ds.VerificationFlag == "UNVERIFIED"
    assert any(e.Manufacturer == "Hygeia" for e in ds.ContributingEquipmentSequence)

    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    root = ds.ContentSequence
    names = [(i.ConceptNameCodeSequence[0].CodeMeaning, i.ValueType) for i in root]
    assert ("Procedure reported", "CODE") in names and ("Image Library", "CONTAINER") in names
    (procedure,) = [i.ConceptCodeSequence[0] for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("363679005", "SCT")  # CID 100, for a DX
    library = next(i for i in root if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    lib_uids = [img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for grp in library.ContentSequence for img in grp.ContentSequence]
    assert lib_uids == [src.SOPInstanceUID]
    # the device observer is the model
    observer = [i for i in root if i.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Name"]
    assert observer and observer[0].TextValue == cnn.identity.name

    d = diagnoses[0]
    groups = report.get_image_measurement_groups()  # TID 1501, one per finding
    assert len(groups) == len(d.findings) and report.get_planar_roi_measurement_groups() == []
    by_label = {g.tracking_identifier.split(" #")[0]: g for g in groups}
    assert set(by_label) == {f.label for f in d.findings}
    for f in d.findings:
        g = by_label[f.label]
        assert g.tracking_uid  # TID 4108 tracking UID
        assert g.finding_type.value == f.code.value and g.finding_type.scheme_designator == "SCT"
        (qe,) = g.get_qualitative_evaluations(name=hd.sr.CodedConcept(f.code.value, "SCT", f.code.meaning))
        assert qe.value == (codes.SCT.Present if f.present else codes.SCT.Absent)
        (prob,) = g.get_measurements(name=codes.DCM.Probability)
        assert prob.value == pytest.approx(f.probability, abs=1e-6)
        assert prob.unit.value == "1" and prob.unit.scheme_designator == "UCUM"
        (source,) = g.source_images
        assert source.referenced_sop_instance_uid == src.SOPInstanceUID
        assert len(prob.referenced_coordinates) == (f.region is not None)
        if f.region is not None:
            (region,) = prob.referenced_coordinates  # the probability is inferred from the region
            assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
            data = np.asarray(region.value, float)
            # scaled from the model's image_size space to the source's Rows x Columns
            sx, sy = src.Columns / d.image_size[1], src.Rows / d.image_size[0]
            cx, cy = f.region.center()
            pts = data[:-1] if len(data) > 1 else data  # closed polylines repeat the first point
            np.testing.assert_allclose(pts.mean(0), [cx * sx, cy * sy], atol=1.0)
            assert 0 <= data[:, 0].min() and data[:, 0].max() <= src.Columns
            assert 0 <= data[:, 1].min() and data[:, 1].max() <= src.Rows
    text = subprocess.run(["dsrdump", str(out[0])], capture_output=True, text=True).stdout
    assert "Algorithm Name" in text and cnn.identity.name in text
    if cnn.identity.weights_sha256:
        assert cnn.identity.weights_sha256[:12] in text


def test_sr_for_a_study_of_several_images(cnn, tmp_path):
    from hygeia_lab import write_phantom_dicom

    paths = [Path(write_phantom_dicom(tmp_path / f"s{i}.dcm", seed=40 + i)) for i in range(2)]
    datasets = [pydicom.dcmread(p) for p in paths]
    if datasets[0].StudyInstanceUID != datasets[1].StudyInstanceUID:  # put both in one study
        for p, ds in zip(paths, datasets):
            ds.StudyInstanceUID = datasets[0].StudyInstanceUID
            ds.save_as(p)
    loaded, diagnoses = _diagnose(cnn, paths)
    out = get_registry().output_format("sr").write(diagnoses, tmp_path / "study_sr.dcm",
                                                   sources=[li.dataset for li in loaded])
    assert dciodvfy_errors(out[0]) == [] and dsrdump_problems(out[0]) == []
    ds = pydicom.dcmread(out[0])
    refs = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert refs == {d.SOPInstanceUID for d in datasets}


def test_sr_bad_sources(cnn, phantom_files, tmp_path):
    from PIL import Image

    loaded, diagnoses = _diagnose(cnn, phantom_files[:2])
    fmt = get_registry().output_format("sr")
    with pytest.raises(InputError, match="one source DICOM image per diagnosis"):
        fmt.write(diagnoses, tmp_path / "x.dcm", sources=[loaded[0].dataset])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="sources\\[0\\]"):
        fmt.write(diagnoses[:1], tmp_path / "x.dcm", sources=[tmp_path / "a.png"])
    if loaded[0].dataset.StudyInstanceUID != loaded[1].dataset.StudyInstanceUID:
        with pytest.raises(InputError, match="one study"):
            fmt.write(diagnoses, tmp_path / "x.dcm", sources=[li.dataset for li in loaded])
    assert not (tmp_path / "x.dcm").exists()


def test_region_scaling_to_source_pixels():
    from hygeia_dicom.sr import scale_region
    from hygeia.vocab import finding

    code = finding("nodule").code
    f = Finding("nodule", code, 0.9, 0.5, Region("box", ((8.0, 16.0), (24.0, 32.0))))
    gtype, data = scale_region(f, (64, 64), rows=512, columns=256)
    assert gtype == "POLYLINE" and data.shape == (5, 2)
    np.testing.assert_allclose(data[0], [32.0, 128.0])  # x * 256/64, y * 512/64
    np.testing.assert_allclose(data[2], [96.0, 256.0])
    np.testing.assert_allclose(data[0], data[-1])
    p = Finding("nodule", code, 0.9, 0.5, Region("point", ((32.0, 32.0),)))
    assert scale_region(p, (64, 64), 128, 128)[0] == "POINT"
    np.testing.assert_allclose(scale_region(p, (64, 64), 128, 128)[1], [[64.0, 64.0]])


def test_cli_diagnose_writes_sr(phantom_files, tmp_path):
    out = tmp_path / "cli_sr.dcm"
    from typer.testing import CliRunner

    from hygeia.cli import get_app

    app = get_app()

    r = CliRunner().invoke(app, ["diagnose", str(phantom_files[0]), "--sr", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    assert dciodvfy_errors(out) == [] and dsrdump_problems(out) == []
    assert pydicom.dcmread(out).StudyInstanceUID == pydicom.dcmread(phantom_files[0]).StudyInstanceUID


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def test_sr_variants_pass_dciodvfy_and_dsrdump(sr_variants):
    for name, (path, _, _) in sr_variants.items():
        assert dciodvfy_errors(path) == [], name
        assert dsrdump_problems(path) == [], name


@pytest.mark.parametrize("name", list(variant_findings()))
def test_sr_read_back_with_highdicom(sr_variants, name):
    """hd.sr.srread and the template accessors give back every finding, probability, call, region,
    source image and tracking UID that was written, one group per image and finding."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from hygeia_dicom.sr import scale_region

    path, diagnoses, sources = sr_variants[name]
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and isinstance(sr.content, hd.sr.MeasurementReport)
    report = sr.content
    assert report.get_planar_roi_measurement_groups() == []  # every group is TID 1501
    groups = report.get_image_measurement_groups()
    expected = [(d, ds, f) for d, ds in zip(diagnoses, sources) for f in d.findings]
    assert len(groups) == len(expected)
    # the tracking UIDs highdicom reports are exactly those in the file, one per group, all distinct
    raw = pydicom.dcmread(path)
    written_uids = [i.UID for i in _walk(raw.ContentSequence) if i.ValueType == "UIDREF"
                    and i.ConceptNameCodeSequence[0].CodeValue == "112040"]
    assert sorted(written_uids) == sorted(str(g.tracking_uid) for g in groups)
    assert len(set(written_uids)) == len(groups)
    by_identifier = {g.tracking_identifier: g for g in groups}
    for n, (d, ds, f) in enumerate(expected, start=1):
        g = by_identifier[f"{f.label} #{n}"]
        assert g.finding_type == hd.sr.CodedConcept(f.code.value, f.code.scheme, f.code.meaning)
        (prob,) = g.get_measurements(name=codes.DCM.Probability)
        assert prob.value == pytest.approx(f.probability, abs=1e-6)
        assert (prob.unit.value, prob.unit.scheme_designator) == ("1", "UCUM")
        (call,) = g.get_qualitative_evaluations(name=g.finding_type)
        assert call.value == (codes.SCT.Present if f.present else codes.SCT.Absent)
        (source,) = g.source_images
        assert source.referenced_sop_instance_uid == ds.SOPInstanceUID
        if f.region is None:
            assert prob.referenced_coordinates == []
        else:  # the probability is inferred from the region (TID 300 / TID 320), selected from the image
            (roi,) = prob.referenced_coordinates
            assert (roi.name.value, roi.relationship_type.value) == ("260753009", "INFERRED FROM")
            gtype, data = scale_region(f, d.image_size, int(ds.Rows), int(ds.Columns))
            assert roi.graphic_type.value == gtype
            np.testing.assert_allclose(roi.value, data, atol=1e-4)
            assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_dsr2html_renders_every_variant(sr_variants, tmp_path):
    for name, (path, diagnoses, _) in sr_variants.items():
        out = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr[-2000:])
        html = out.stdout
        assert "Imaging Measurement Report" in html and "UNVERIFIED" in html, name
        for f in (f for d in diagnoses for f in d.findings):
            assert f.code.meaning in html and f"{f.label} #" in html, (name, f.label)


def test_procedure_reported_is_from_cid_100():
    from hygeia_dicom._sr_content import procedure_codes

    def ds(modality, procedure=None):
        out = pydicom.Dataset()
        out.Modality = modality
        if procedure:
            item = pydicom.Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = procedure
            out.ProcedureCodeSequence = [item]
        return out

    def first(d):
        c = procedure_codes(d)[0]
        return c.value, c.scheme_designator

    assert first(ds("DX")) == first(ds("CR")) == first(ds("MG")) == ("363679005", "SCT")
    assert first(ds("CT")) == ("25045-6", "LN") and first(ds("MR")) == ("25056-3", "LN")
    # a source procedure code in CID 100 is kept; one outside it (a local chest X-ray code) is not
    assert first(ds("MR", ("126020", "DCM", "Multiparametric MRI"))) == ("126020", "DCM")
    assert first(ds("DX", ("36643-5", "LN", "XR Chest 2V"))) == ("363679005", "SCT")


def _content_json(ds) -> dict:
    """The dataset as JSON, less what differs on every build (UIDs of new items, dates, times)."""
    masked = {"0040A124", "00080012", "00080013", "00080023", "00080033", "0040A032", "0018A002"}

    def scrub(node):
        if isinstance(node, dict):
            return {k: ("*" if k in masked else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(ds.to_json_dict())


def test_evidence_without_pixel_data_gives_the_same_report(tmp_path):
    """Full dataset, header-only dataset and file path give the same SR content; the source keeps
    its pixel data and no Pixel Data reaches the SR."""
    from hygeia_dicom.sr import build_sr
    from hygeia_lab import write_phantom_dicom

    path = write_phantom_dicom(tmp_path / "p.dcm", seed=5)
    full = pydicom.dcmread(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    d = [Diagnosis(variant_findings()["regions"][0], MODEL, IMAGE_SIZE)]
    uids = {"series_instance_uid": pydicom.uid.generate_uid(), "sop_instance_uid": pydicom.uid.generate_uid()}
    built = [build_sr(d, [src], **uids) for src in (full, header, path)]
    assert _content_json(built[0]) == _content_json(built[1]) == _content_json(built[2])
    assert "PixelData" in full and all("PixelData" not in sr for sr in built)


@pytest.mark.parametrize("change, where", [
    (dict(probability=math.nan), "findings[1].probability (effusion)"),
    (dict(probability=1.5), "findings[1].probability (effusion)"),
    (dict(threshold=-0.1), "findings[1].threshold (effusion)"),
    (dict(label=" "), "findings[1].label"),
    (dict(code=Code("60046008", "SCT", "x" * 65)), "findings[1].code.meaning (effusion)"),
    (dict(code=Code("", "SCT", "Pleural effusion")), "findings[1].code.value (effusion)"),
    (dict(region=Region("point", ((math.inf, 1.0),))), "findings[1].region (effusion)"),
])
def test_sr_bad_findings_give_one_line_errors(tmp_path, phantom_files, change, where):
    from dataclasses import replace

    fs = list(variant_findings()["regions"][0])
    fs[1] = replace(fs[1], **change)
    with pytest.raises(InputError) as e:
        get_registry().output_format("sr").write([Diagnosis(fs, MODEL, IMAGE_SIZE)], tmp_path / "x.dcm",
                                                 sources=[phantom_files[0]])
    assert f"diagnoses[0].{where}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="image_size"):
        get_registry().output_format("sr").write([Diagnosis(fs[:1], MODEL, (0, 64))], tmp_path / "x.dcm",
                                                 sources=[phantom_files[0]])
    assert not (tmp_path / "x.dcm").exists()
