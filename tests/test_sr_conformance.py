"""TID 1500 conformance of Hygeia's SRs, checked by pixelmed's DICOM SR validator.

``com.pixelmed.validate.DicomSRValidator`` (Debian package ``pixelmed-apps``, jar at
``/usr/share/java/pixelmed.jar``) checks the content tree against its compiled templates and
context groups. It exits 0 whatever it finds, so the lines starting with ``Error`` are what
count. On JDK 17 its XPath needs the three ``jdk.xml.*Limit=0`` properties. All SR variants go
through one JVM when ``javac`` is there (a few lines of Java over the validator class), else
one ``java`` run per file.

One thing pixelmed 20220618 reports is not a fault of the SR, and only it is tolerated: the
Warning "Content Item not in template" on the group's qualitative evaluation (CODE, concept = the
finding, value = Present/Absent), which is TID 1501 row 11 in the current standard and missing
from pixelmed's template tables.

Every group is TID 1501, a located finding's probability inferred from its region (TID 300 row 9,
TID 320). pixelmed picks the group template once per Imaging Measurements container, not per
group: with exactly one SCOORD "Image Region" directly in the groups it checks *every* group
against TID 1410, so a report of one TID 1410 group beside region-less groups (the cnn's usual
output: one located finding) got two "Missing conditional content item" errors per region-less
group. ``one_region`` below is that report, and ``two_regions`` the same findings with a second
located one.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hygeia.api import Diagnosis
from hygeia.plugins import get_registry

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
JAVA_FLAGS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]

pytestmark = [
    pytest.mark.skipif(shutil.which("java") is None or not PIXELMED_JAR.is_file(),
                       reason="needs java and pixelmed's SR validator (Debian package pixelmed-apps, "
                              "/usr/share/java/pixelmed.jar): install with `make system-deps`"),
    pytest.mark.slow,
]

_BATCH_VALIDATOR = """\
import com.pixelmed.validate.DicomSRValidator;

public class ValidateSRFiles {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("==== " + path);
            System.out.println(validator.validate(path));
        }
    }
}
"""

# the qualitative evaluation of a measurement group, which pixelmed's templates lack
_QUALITATIVE_EVALUATION = re.compile(
    r'^Warning: 1\.\d+\.\d+\.\d+: /CONTAINER \(126000,DCM,"Imaging Measurement Report"\)'
    r'/CONTAINER \(126010,DCM,"Imaging Measurements"\)/CONTAINER \(125007,DCM,"Measurement Group"\)'
    r'/CODE \(([^,]+),([^,]+),"[^"]*"\): Content Item not in template$')


def pixelmed(paths: list[Path], workdir: Path) -> dict[Path, list[str]]:
    """pixelmed's report lines for each SR file."""
    cp = str(PIXELMED_JAR)
    if shutil.which("javac"):
        (workdir / "ValidateSRFiles.java").write_text(_BATCH_VALIDATOR)
        subprocess.run(["javac", "-cp", cp, "-d", str(workdir), str(workdir / "ValidateSRFiles.java")],
                       check=True, capture_output=True, timeout=120)
        out = subprocess.run(["java", *JAVA_FLAGS, "-cp", f"{cp}:{workdir}", "ValidateSRFiles", *map(str, paths)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        chunks = re.split(r"^==== (.*)$", out.stdout, flags=re.MULTILINE)[1:]
        reports = {Path(chunks[i]): chunks[i + 1].splitlines() for i in range(0, len(chunks), 2)}
    else:
        reports = {}
        for p in paths:
            out = subprocess.run(["java", *JAVA_FLAGS, "-cp", cp, "com.pixelmed.validate.DicomSRValidator", str(p)],
                                 capture_output=True, text=True, timeout=300)
            reports[p] = (out.stdout + out.stderr).splitlines()
    assert set(reports) == set(paths)
    for p, lines in reports.items():  # pixelmed recognised the IOD and the root template
        assert "Found Root Template TID_1500 (MeasurementReport)" in lines, (p, lines[:20])
    return reports


def _finding_codes(diagnoses: list[Diagnosis]) -> set[tuple[str, str]]:
    return {(f.code.value, f.code.scheme) for d in diagnoses for f in d.findings}


def _unexplained_warnings(lines: list[str], diagnoses: list[Diagnosis]) -> list[str]:
    codes = _finding_codes(diagnoses)
    out = []
    for line in (ln for ln in lines if ln.startswith("Warning")):
        m = _QUALITATIVE_EVALUATION.match(line)
        if not (m and (m.group(1), m.group(2)) in codes):
            out.append(line)
    return out


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    from test_dicom_sr import BOX, IMAGE_SIZE, MODEL, POINT, _f, write_sr_variants

    d = tmp_path_factory.mktemp("sr_conformance")
    variants = write_sr_variants(d / "variants")
    # a report where a single group has a region (the cnn's usual output: one located finding)
    from hygeia_lab import write_phantom_dicom

    one = [Diagnosis([_f("nodule", 0.9, POINT), _f("consolidation", 0.2), _f("effusion", 0.1),
                      _f("cardiomegaly", 0.3), _f("pneumothorax", 0.05)], MODEL, IMAGE_SIZE)]
    src = write_phantom_dicom(d / "one_src.dcm", seed=9)
    (one_path,) = get_registry().output_format("sr").write(one, d / "one_region.dcm", sources=[src])
    variants["one_region"] = (one_path, one, [src])
    # the same findings and scores with a second located finding
    two = [Diagnosis([*one[0].findings[:2], _f("effusion", 0.1, BOX), *one[0].findings[3:]], MODEL, IMAGE_SIZE)]
    (two_path,) = get_registry().output_format("sr").write(two, d / "two_regions.dcm", sources=[src])
    variants["two_regions"] = (two_path, two, [src])
    reports = pixelmed([v[0] for v in variants.values()], d)
    return {name: (reports[v[0]], v[1], v[0]) for name, v in variants.items()}


@pytest.mark.parametrize("name", ["regions", "none_present", "every_finding", "user_labels", "study_of_two",
                                  "one_region", "two_regions"])
def test_pixelmed_finds_no_errors(validated, name):
    lines, diagnoses, _ = validated[name]
    assert [ln for ln in lines if ln.startswith("Error")] == []
    assert _unexplained_warnings(lines, diagnoses) == []
    # every group's qualitative evaluation is the one warning pixelmed gives
    assert sum(ln.startswith("Warning") for ln in lines) == sum(len(d.findings) for d in diagnoses)


def test_one_region_report_keeps_its_region(validated):
    """The error-free one-region report still carries the region: the nodule's probability is
    inferred from a SCOORD POINT selected from the source image, and the other groups have none."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _, _, path = validated["one_region"]
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    coords = {g.tracking_identifier: g.get_measurements(name=codes.DCM.Probability)[0].referenced_coordinates
              for g in groups}
    assert [k for k, c in coords.items() if c] == ["nodule #1"] and len(coords) == 5
    assert coords["nodule #1"][0].graphic_type.value == "POINT"
