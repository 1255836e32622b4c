"""TID 1500 conformance of Hygeia's SRs, checked by pixelmed's DICOM SR validator.

``com.pixelmed.validate.DicomSRValidator`` (Debian package ``pixelmed-apps``, jar at
``/usr/share/java/pixelmed.jar``) checks the content tree against its compiled templates and
context groups. It exits 0 whatever it finds, so the lines starting with ``Error`` are what
count. On JDK 17 its XPath needs the three ``jdk.xml.*Limit=0`` properties. All SR variants go
through one JVM when ``javac`` is there (a few lines of Java over the validator class), else
one ``java`` run per file.

Two things pixelmed 20220618 reports are not faults of the SR, and only these are tolerated:

* Warning "Content Item not in template" on the group's qualitative evaluation (CODE, concept =
  the finding, value = Present/Absent): TID 1501 row 11 (and its TID 1410 counterpart) in the
  current standard, missing from pixelmed's template tables.
* In a report where exactly one group has an Image Region (the cnn's usual output, tested
  below on its own), two "Missing conditional content item" errors per group without a region
  (TID 1410 rows 5 and 7). pixelmed decides which group templates apply once per Imaging
  Measurements container, not per group: its TID 1500 includes TID 1410 for the whole container
  when ``count(container[125007]/scoord[111030, CONTAINS]) = 1`` and then checks every
  Measurement Group in it against TID 1410, which requires an Image Region (row 5) or a
  Referenced Segmentation Frame (row 7). With 0 or >= 2 regions the count is not 1 and every
  group is checked against TID 1501 only. No valid encoding of this report avoids it: TID 1500
  allows one Imaging Measurements container (row 6, VM 1), TID 1501 groups are Measurement
  Group containers by definition, and the alternatives change the content (an invented region
  for a finding the model did not locate, an extra group, or moving findings to TID 1500's
  Qualitative Evaluations container, which holds no probability, algorithm, tracking
  identifier or source image). ``test_pixelmed_counts_image_regions_per_container`` shows the
  rule: the same findings with a second region give no error.
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
_TID1410_ON_ALL_GROUPS = re.compile(r'^Error: Template 1410 PlanarROIMeasurements/\[Row 1\] CONTAINER '
                                    r'\(125007,DCM,"Measurement Group"\)/\[Row (5|7)\] .*: within 1\.\d+\.(\d+): .*'
                                    r'Missing conditional content item$')


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
    return {name: (reports[v[0]], v[1]) for name, v in variants.items()}


@pytest.mark.parametrize("name", ["regions", "none_present", "every_finding", "user_labels", "study_of_two"])
def test_pixelmed_finds_no_errors(validated, name):
    lines, diagnoses = validated[name]
    assert [ln for ln in lines if ln.startswith("Error")] == []
    assert _unexplained_warnings(lines, diagnoses) == []
    # every group's qualitative evaluation is the one warning pixelmed gives
    assert sum(ln.startswith("Warning") for ln in lines) == sum(len(d.findings) for d in diagnoses)


def test_pixelmed_with_one_image_region_only_misapplies_tid1410(validated):
    """With one Image Region in the report, pixelmed's errors are exactly its TID 1410 checks run on
    the TID 1501 groups (rows 5 and 7, Image Region / Referenced Segmentation Frame), two per group
    without a region, nothing else (see the module docstring for why no valid encoding avoids them)."""
    lines, diagnoses = validated["one_region"]
    errors = [ln for ln in lines if ln.startswith("Error")]
    matched = [_TID1410_ON_ALL_GROUPS.match(ln) for ln in errors]
    assert all(matched), [ln for ln, m in zip(errors, matched) if not m]
    regionless = {str(k) for k, f in enumerate(diagnoses[0].findings, start=1) if f.region is None}
    assert sorted((m.group(2), m.group(1)) for m in matched) == sorted((k, r) for k in regionless for r in "57")
    assert len(errors) == 8 and _unexplained_warnings(lines, diagnoses) == []


def test_pixelmed_counts_image_regions_per_container(validated):
    """The same report with a second located finding: the container holds two Image Regions, so
    pixelmed applies TID 1501 to each group and finds nothing, the three region-less groups
    included, although they are encoded exactly as in the one-region report."""
    lines, diagnoses = validated["two_regions"]
    assert [ln for ln in lines if ln.startswith("Error")] == []
    assert _unexplained_warnings(lines, diagnoses) == []
