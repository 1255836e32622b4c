"""Label files in the users' layouts (hygeia.data.labels) and finding codes (hygeia.codes)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hygeia.codes import BUILTIN_CODES, code_for, known_names, read_codes
from hygeia.data.labels import Box, read_labels
from hygeia.errors import InputError
from hygeia.vocab import FINDINGS, Code

NAN = float("nan")


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


CHEXPERT = [
    ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Indication", "No Finding", "Cardiomegaly", "Edema"],
    ["train/patient00001/study1/view1_frontal.jpg", "Male", 60, "Frontal", "PA", "fever", "", "1.0", "-1.0"],
    ["train/patient00001/study2/view1_frontal.jpg", "Male", 60, "Frontal", "AP", "", "1.0", "0.0", ""],
    ["train/patient00002/study1/view1_frontal.jpg", "Female", 41, "Frontal", "PA", "cough", "", "-1", "1"],
]


@pytest.fixture
def chexpert(tmp_path: Path) -> Path:
    touch(tmp_path, *(r[0] for r in CHEXPERT[1:]))
    return write_csv(tmp_path / "train.csv", CHEXPERT)




def test_chexpert_columns_patients_text(chexpert: Path):
    t = read_labels(chexpert, text_column="Indication")
    assert t.layout == "chexpert"
    assert t.findings == ("No Finding", "Cardiomegaly", "Edema")  # Sex, Age, views and text are not findings
    assert t.patients == ("patient00001", "patient00001", "patient00002")
    assert [r.text for r in t] == ["fever", "", "cough"]
    assert [r.row for r in t] == [1, 2, 3]
    assert t[0].image == str(chexpert.parent / CHEXPERT[1][0])
    assert t.labels.dtype == np.float32
    np.testing.assert_array_equal(t.labels, [[NAN, 1, NAN], [1, 0, NAN], [NAN, NAN, 1]])


@pytest.mark.parametrize("policy, value", [("ignore", NAN), ("u-ones", 1.0), ("u-zeros", 0.0), ("U_Ones", 1.0)])
def test_chexpert_uncertain_policies(chexpert: Path, policy: str, value: float):
    t = read_labels(chexpert, uncertain=policy)
    np.testing.assert_array_equal(t.labels[:, 2], [value, NAN, 1.0])  # Edema: -1, blank, 1
    np.testing.assert_array_equal(t.labels[2, 1], value)


def test_chexpert_patient_column_image_root_and_dataset_prefix(tmp_path: Path):
    touch(tmp_path / "imgs", "a.png", "b.png")
    csv_path = write_csv(tmp_path / "labels.csv", [["Path", "Patient ID", "Mass"], ["a.png", "P7", 1], ["b.png", "", 0]])
    t = read_labels(csv_path, image_root=tmp_path / "imgs")
    assert t.patients == ("P7", "b")  # blank patient: the file name
    # CheXpert's own paths start with the dataset folder, one level above its CSV
    root = tmp_path / "CheXpert-v1.0-small"
    touch(root, "train/patient00009/study1/view1_frontal.jpg")
    csv_path = write_csv(root / "train.csv", [["Path", "Pneumonia"],
                                               ["CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg", 1]])
    assert read_labels(csv_path).patients == ("patient00009",)


def test_findings_selects_and_orders(chexpert: Path):
    t = read_labels(chexpert, findings=["Edema", "Cardiomegaly"])
    assert t.findings == ("Edema", "Cardiomegaly")
    np.testing.assert_array_equal(t.labels[1], [NAN, 0])
    with pytest.raises(InputError, match="no Pneumonia"):
        read_labels(chexpert, findings=["Pneumonia"])


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    touch(tmp_path / "images", "00000001_000.png", "00000001_001.png", "00000002_000.png")
    return write_csv(tmp_path / "Data_Entry_2017.csv", [
        ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "OriginalImage[Width", "Height]", ""],
        ["00000001_000.png", "Cardiomegaly|Effusion", 0, 1, 58, 1024, 1024],
        ["00000001_001.png", "No Finding", 1, 1, 58, 1024, 1024],
        ["00000002_000.png", "Infiltration", 0, 2, 81, 1024, 1024],
    ])


def test_nih_union_of_labels_and_patients(nih: Path):
    t = read_labels(nih)
    assert t.layout == "nih"
    assert t.findings == ("Cardiomegaly", "Effusion", "Infiltration")
    np.testing.assert_array_equal(t.labels, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert t.patients == ("1", "1", "2")
    assert Path(t[0].image) == nih.parent / "images" / "00000001_000.png"


@pytest.mark.parametrize("header, tail", [
    (["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""], ["", "", ""]),  # NIH's own file
    (["Image Index", "Finding Label", "x", "y", "w", "h"], []),
])
def test_nih_boxes_both_headers(nih: Path, header: list[str], tail: list[str]):
    boxes = write_csv(nih.parent / "boxes.csv", [
        header,
        ["00000001_000.png", "Cardiomegaly", "225.5", 547, 86, 79, *tail],
        ["00000002_000.png", "Infiltrate", 1, 2, 3, 4, *tail],
        ["99999999_000.png", "Mass", 1, 2, 3, 4, *tail],  # not in the label file: left out
    ])
    t = read_labels(nih, boxes=boxes)
    assert t[0].boxes == (Box("Cardiomegaly", 225.5, 547.0, 86.0, 79.0),)
    assert t[1].boxes == ()
    assert t[2].boxes == (Box("Infiltration", 1.0, 2.0, 3.0, 4.0),)


def test_bad_box_value_names_row(nih: Path):
    boxes = write_csv(nih.parent / "boxes.csv", [["Image Index", "Finding Label", "x", "y", "w", "h"],
                                                 ["00000001_000.png", "Mass", "a", 1, 1, 1]])
    with pytest.raises(InputError, match=r"row 1 \(line 2\) of .*boxes.csv"):
        read_labels(nih, boxes=boxes)


def datalist(tmp_path: Path, doc: dict) -> Path:
    touch(tmp_path / "imagesTr", "a.png", "b.png", "c.png")
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


def test_datalist_lists_and_class_index(tmp_path: Path):
    path = datalist(tmp_path, {
        "findings": ["Effusion", "Nodule"],
        "training": [{"image": "imagesTr/a.png", "label": [1, 0], "patient": "p1", "text": "cough"},
                     {"image": "imagesTr/b.png", "label": [-1, None]},
                     {"image": "imagesTr/c.png", "label": 1}],
        "validation": [{"image": "imagesTr/c.png", "label": [0, 0]}]})
    t = read_labels(path, text_column="text", uncertain="u-ones")
    assert t.layout == "datalist" and t.findings == ("Effusion", "Nodule")
    np.testing.assert_array_equal(t.labels, [[1, 0], [1, NAN], [0, 1]])
    assert t.patients == ("p1", "b", "c") and t[0].text == "cough" and t[1].text == ""
    assert len(read_labels(path, split="val")) == 1
    with pytest.raises(InputError, match="split 'test'.*one of training, validation"):
        read_labels(path, split="test")


def test_datalist_names_from_decathlon_labels_or_codes(tmp_path: Path):
    path = datalist(tmp_path, {"labels": {"1": "Nodule", "0": "Effusion"},
                               "training": [{"image": "imagesTr/a.png", "label": [0, 1]}]})
    assert read_labels(path).findings == ("Effusion", "Nodule")
    path.write_text(json.dumps({"training": [{"image": "imagesTr/a.png", "label": [0, 1]}]}))
    with pytest.raises(InputError, match="finding names .*--codes"):
        read_labels(path)
    codes = write_csv(tmp_path / "codes.csv", [["finding", "code", "scheme", "meaning"],
                                               ["Hernia", "H1", "99LOCAL", "Hernia (local code)"],
                                               ["Mass", "4147007", "SCT", "Mass"]])
    t = read_labels(path, codes=codes)
    assert t.findings == ("Hernia", "Mass")
    assert t.codes() == (Code("H1", "99LOCAL", "Hernia (local code)"), Code("4147007", "SCT", "Mass"))


def test_relative_paths(tmp_path: Path, monkeypatch, chexpert: Path):
    path = datalist(tmp_path, {"findings": ["A"], "training": [{"image": "imagesTr/a.png", "label": [1]}]})
    monkeypatch.chdir(tmp_path.parent)
    t = read_labels(Path(tmp_path.name) / path.name)
    assert t[0].image == str(tmp_path / "imagesTr" / "a.png")
    assert read_labels(Path(tmp_path.name) / chexpert.name)[0].image == str(tmp_path / CHEXPERT[1][0])


def test_datalist_bad_label(tmp_path: Path):
    path = datalist(tmp_path, {"findings": ["A", "B"], "training": [{"image": "imagesTr/a.png", "label": [1]}]})
    with pytest.raises(InputError, match="item 1 of 'training'.*a list of 2 values"):
        read_labels(path)


def test_patient_split_has_no_overlap(tmp_path: Path):
    names = [f"p{p:02d}_{k}.png" for p in range(20) for k in range(3)]
    touch(tmp_path, *names)
    path = write_csv(tmp_path / "l.csv", [["Path", "Patient ID", "Mass"], *([n, n[:3], k % 2] for k, n in enumerate(names))])
    t = read_labels(path)
    train, val = t.patient_split(0.25, seed=1)
    assert not set(train.patients) & set(val.patients)
    assert len(train) + len(val) == len(t) and len(set(val.patients)) == 5
    assert val.patients == t.patient_split(0.25, seed=1)[1].patients  # the seed decides
    assert val.findings == t.findings
    with pytest.raises(InputError, match="at least two patients"):
        t.subset([0, 1, 2]).patient_split(0.5)
    with pytest.raises(InputError, match="val_fraction"):
        t.patient_split(1.0)


def test_pos_weight_ignores_nan(chexpert: Path):
    t = read_labels(chexpert)
    # No Finding: 1 pos, 0 neg -> 1; Cardiomegaly: 1 pos 1 neg (the -1 ignored) -> 1; Edema: 1 pos, no neg -> 1
    np.testing.assert_array_equal(t.pos_weight(), [1, 1, 1])
    t = read_labels(chexpert, uncertain="u-zeros")
    np.testing.assert_allclose(t.pos_weight(), [1, 2, 1])
    assert t.pos_weight().dtype == np.float32


def test_missing_image_names_row_and_file(chexpert: Path):
    (chexpert.parent / CHEXPERT[2][0]).unlink()
    (chexpert.parent / CHEXPERT[3][0]).unlink()
    with pytest.raises(InputError) as e:
        read_labels(chexpert)
    msg = str(e.value)
    assert "row 2 (line 3)" in msg and str(chexpert) in msg and "patient00001/study2/view1_frontal.jpg" in msg
    assert "1 more rows" in msg and "\n" not in msg


@pytest.mark.parametrize("cell", ["2", "yes", "0.5"])
def test_unknown_label_value(chexpert: Path, cell: str):
    rows = [list(r) for r in CHEXPERT]
    rows[2][7] = cell
    write_csv(chexpert, rows)
    with pytest.raises(InputError, match=rf"label 'Cardiomegaly' in row 2 \(line 3\) of .*train.csv.*1, 0, -1.*{cell}"):
        read_labels(chexpert)


def test_missing_columns_and_layouts(chexpert: Path, nih: Path):
    with pytest.raises(InputError, match="ChestX-ray14 columns .*got no Image Index, Finding Labels"):
        read_labels(chexpert, layout="nih")
    write_csv(chexpert, [["Image", "Label"], ["a.png", 1]])
    with pytest.raises(InputError, match="CheXpert-style CSV .*got Image, Label"):
        read_labels(chexpert)
    with pytest.raises(InputError, match="text column 'Report'"):
        read_labels(nih, text_column="Report")
    with pytest.raises(InputError, match="layout"):
        read_labels(nih, layout="mimic")
    with pytest.raises(InputError, match="uncertain"):
        read_labels(nih, uncertain="u-half")


@pytest.mark.parametrize("content, needle", [
    (b"", "empty file"),
    (b"\xff\xfe\x00garbage\x80\x81", "readable CSV"),
    (b"Path,Mass\na.png,1,0,1\n", r"row 1 \(line 2\).*2 comma-separated fields"),
    (b"Path,Mass\n", "at least one labelled image"),
])
def test_unreadable_csv(tmp_path: Path, content: bytes, needle: str):
    path = tmp_path / "l.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        read_labels(path)
    with pytest.raises(InputError, match="no such file"):
        read_labels(tmp_path / "none.csv")


def test_unmapped_finding_lists_known_names():
    with pytest.raises(InputError) as e:
        code_for("Hernia")
    msg = str(e.value)
    assert "'Hernia'" in msg and "--codes" in msg and "Pleural Effusion" in msg and "cardiomegaly" in msg


def test_codes_vocabulary_first_then_builtin_then_user(tmp_path: Path):
    for f in FINDINGS:  # the built-in models' names keep their codes
        assert code_for(f.label.upper()) == f.code
    assert code_for("Pleural_Effusion") == code_for("effusion")
    assert code_for("No Finding").value == "17621005"
    codes = write_csv(tmp_path / "codes.csv", [["Hernia", "H1", "", ""], ["Mass", "4147007", "SCT", "Mass"]])
    user = read_codes(codes)
    assert user["Hernia"] == Code("H1", "SCT", "Hernia")  # blank scheme: SCT; blank meaning: the name
    assert code_for("hernia", codes) == code_for("Hernia", user)
    assert "Hernia" in known_names(user)
    write_csv(codes, [["Mass", "1", "SCT", "x"], ["mass", "2", "SCT", "y"]])
    with pytest.raises(InputError, match="line 2 of codes file.*one code per finding"):
        read_codes(codes)


def test_builtin_codes_are_in_pydicoms_snomed_dictionary():
    from pydicom.sr._concepts_dict import concepts

    sct = {code: meaning for entry in concepts["SCT"].values() for code, (meaning, _) in entry.items()}
    for name, code in BUILTIN_CODES.items():
        assert code.scheme == "SCT" and code.value in sct, name
        assert sct[code.value].lower().startswith(code.meaning.lower()), (name, sct[code.value])


def test_a_file_without_any_label_or_with_a_column_twice_is_refused(chexpert: Path):
    rows = [list(r) for r in CHEXPERT]
    for r in rows[1:]:
        r[6:] = ["", "", ""] if r is not rows[3] else ["", "-1", ""]  # -1 is ignored by default
    write_csv(chexpert, rows)
    with pytest.raises(InputError, match="at least one 0 or 1 label, got every label blank or ignored"):
        read_labels(chexpert)
    assert np.nanmax(read_labels(chexpert, uncertain="u-ones").labels) == 1.0
    rows = [r + [r[7]] for r in CHEXPERT]  # Cardiomegaly twice: which one would count?
    write_csv(chexpert, rows)
    with pytest.raises(InputError, match="each column once, got Cardiomegaly more than once"):
        read_labels(chexpert)
