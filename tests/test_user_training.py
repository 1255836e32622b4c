"""Training and evaluating the cnn on labelled image files, as a user does with their own studies.

The data are phantoms exported in the users' layouts (``hygeia phantoms export``); the commands are
the ones docs/user-data.md shows: ``hygeia train cnn --data``, ``hygeia evaluate diagnoser --bundle
--data``, ``hygeia diagnose --bundle``.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hygeia.bundles import load_bundle
from hygeia.errors import InputError
from hygeia.vocab import finding
from hygeia_cnn.plugin import CnnDiagnoser
from hygeia_cnn.train import train
from hygeia_lab.export import export_phantoms

SIZE = 64
FAST = {"epochs": 1, "size": SIZE, "batch_size": 16, "workers": 0, "threads": 1}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hygeia", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("userdata")
    train_csv = export_phantoms(root / "train", layout="chexpert", n=48, size=SIZE, image_format="png", progress=False)
    valid_csv = export_phantoms(root / "valid", layout="chexpert", n=24, size=SIZE, split="val",
                                transfer_syntax="jpeg2000", progress=False)
    nih_csv = export_phantoms(root / "nih", layout="nih", n=32, size=SIZE, image_format="png", progress=False)
    return {"root": root, "train": train_csv, "valid": valid_csv, "nih": nih_csv}


@pytest.fixture(scope="module")
def bundle(data: dict[str, Path]) -> Path:
    return train(data["root"] / "B", seed=0, progress=False, data=data["train"], **FAST)


def _header(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as fh:
        return next(csv.reader(fh))


def test_bundle_reports_the_users_findings_with_codes(data, bundle):
    cfg = json.loads((bundle / "config.json").read_text())
    columns = _header(data["train"])
    assert cfg["findings"] == columns[columns.index("No Finding"):]
    assert cfg["input_size"] == [SIZE, SIZE]
    assert cfg["codes"]["Pleural Effusion"]["value"] == finding("effusion").code.value
    assert cfg["data"]["n_train"] + cfg["data"]["n_val"] == 48
    rows = list(csv.DictReader(open(bundle / "metrics.csv")))
    assert len(rows) == 1 and "val_auroc_Pleural Effusion" in rows[0] and float(rows[0]["train_images_per_s"]) > 0
    assert (bundle / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diag = CnnDiagnoser(bundle, heatmaps=False)
    assert diag.findings == tuple(cfg["findings"]) and diag.input_size == (SIZE, SIZE)
    out = diag.diagnose(np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32))
    assert [f.label for f in out[0].findings] == cfg["findings"]
    assert out[0].findings[cfg["findings"].index("Pleural Effusion")].code == finding("effusion").code


def test_nih_layout_trains(data):
    b = train(data["root"] / "nih_b", seed=1, progress=False, data=data["nih"], **FAST)
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["findings"] == sorted(cfg["findings"]) and "No Finding" not in cfg["findings"]


def test_cli_evaluate_and_diagnose_jpeg2000_with_the_bundle(data, bundle):
    ev = _cli("evaluate", "diagnoser", "cnn", "--bundle", str(bundle), "--data", str(data["valid"]), "--json",
              "--roc", str(data["root"] / "roc.png"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(ev.stdout)
    assert res["n_images"] == 24 and set(res["per_finding"]) <= set(json.loads((bundle / "config.json").read_text())["findings"])
    for r in res["per_finding"].values():
        if np.isfinite(r["auroc"]):
            assert r["ci95"][0] <= r["auroc"] <= r["ci95"][1]
    assert (data["root"] / "roc.png").is_file()
    dcm = sorted((data["valid"].parent).rglob("*.dcm"))[0]
    dg = _cli("diagnose", str(dcm), "--plugin", "cnn", "--bundle", str(bundle), "--json")
    assert dg.returncode == 0, dg.stderr[-2000:]
    assert [f["label"] for f in json.loads(dg.stdout)[0]["findings"]][0] == "No Finding"


def test_shipped_model_evaluates_on_a_chexpert_file_by_code(data):
    """The shipped phantom model's ``effusion`` is the file's ``Pleural Effusion`` (same SNOMED code)."""
    ev = _cli("evaluate", "diagnoser", "cnn", "--data", str(data["valid"]), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(ev.stdout)
    assert "Pleural Effusion" in res["per_finding"] and "No Finding" in res["not_reported"]


def _broken_copy(data: dict[str, Path], tmp: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    rows = list(csv.reader(open(data["train"], newline="")))
    edit(rows)
    out = tmp / "train.csv"
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return out


def test_unmapped_finding_is_a_clear_error_and_writes_nothing(data, tmp_path):
    def rename(rows):  # type: ignore[no-untyped-def]
        rows[0][rows[0].index("Nodule")] = "Granuloma"
    bad = _broken_copy(data, tmp_path, rename)
    r = _cli("train", "cnn", "--data", str(bad), "--image-root", str(data["train"].parent), "--out",
             str(tmp_path / "B"), "--epochs", "1")
    assert r.returncode == 2 and "Granuloma" in r.stderr and "--codes" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "B").exists()
    codes = tmp_path / "codes.csv"
    codes.write_text("finding,code,scheme,meaning\nGranuloma,45647009,SCT,Granuloma\n")
    b = train(tmp_path / "B2", progress=False, data=bad, image_root=data["train"].parent, codes=codes, **FAST)
    assert json.loads((b / "config.json").read_text())["codes"]["Granuloma"]["value"] == "45647009"


def test_missing_and_corrupt_images_name_the_row_and_file(data, tmp_path):
    def missing(rows):  # type: ignore[no-untyped-def]
        rows[3][0] = "train/nowhere/view1_frontal.png"
    bad = _broken_copy(data, tmp_path, missing)
    r = _cli("train", "cnn", "--data", str(bad), "--image-root", str(data["train"].parent), "--out", str(tmp_path / "B"))
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stdout + r.stderr
    assert "row 3" in r.stderr and r.stderr.count("\n") == 1  # one line, naming the row
    corrupt = tmp_path / "img" / "broken.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    def point(rows):  # type: ignore[no-untyped-def]
        rows[5][0] = str(corrupt)
    bad2 = _broken_copy(data, tmp_path, point)
    with pytest.raises(InputError, match=r"row 5 .*broken\.png"):
        train(tmp_path / "C", progress=False, data=bad2, image_root=data["train"].parent, **FAST)
    assert not (tmp_path / "C").exists()


def test_init_fine_tunes_and_resume_continues(data, bundle, tmp_path):
    ft = train(tmp_path / "ft", progress=False, data=data["train"], init=bundle, **FAST)
    cfg = json.loads((ft / "config.json").read_text())
    n = len(load_bundle(bundle).tensors)
    assert cfg["data"]["init"].startswith(f"initialised {n} of {n} tensors")
    out = tmp_path / "r"
    train(out, progress=False, data=data["train"], **{**FAST, "patience": 5})
    train(out, progress=False, data=data["train"], resume=True, **{**FAST, "epochs": 2, "patience": 5})
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "metrics.csv"))] == [1, 2]
    with pytest.raises(InputError, match="size"):
        train(tmp_path / "x", progress=False, data=data["train"], size=8)


def test_gateway_diagnoses_with_a_trained_bundle_and_writes_its_findings_to_the_sr(data, bundle, tmp_path):
    """The PACS path for a site's own model: the gateway's in-process diagnoser from ``diagnoser_bundle``,
    and the SR it builds carries the bundle's findings and codes."""
    import pydicom
    from hygeia_pacs import GatewayConfig
    from hygeia_pacs.gateway import Gateway

    from hygeia.plugins import get_registry

    cfg = GatewayConfig.from_dict({"spool": str(tmp_path / "spool"), "diagnoser": "cnn", "allowed_callers": ["SCU"],
                                   "cstore": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112},
                                   "diagnoser_bundle": str(bundle)})
    diag = Gateway(cfg).diagnoser()
    assert diag.findings == tuple(json.loads((bundle / "config.json").read_text())["findings"])
    dcm = sorted(data["valid"].parent.rglob("*.dcm"))[0]
    from hygeia.data.io import load_image, prepare_image

    li = load_image(dcm)
    d = diag.diagnose(prepare_image(li.pixels, size=diag.input_size)[None])
    (sr,) = get_registry().output_format("sr").build(d, sources=[li.dataset])
    assert isinstance(sr, pydicom.Dataset)
    text = str(sr)
    assert "Pleural effusion" in text and "60046008" in text


def test_nih_boxes_give_region_hit_rates(data):
    """``--boxes``: each box of a present finding counts as hit when the diagnoser calls the finding
    with a region centred in the box (scaled from the image's pixels to the model's input)."""
    from hygeia.data.labels import read_labels
    from hygeia_lab.evaluation.user_data import evaluate_items

    import hygeia

    folder = data["nih"].parent
    table = read_labels(data["nih"], boxes=folder / "BBox_List.csv")
    n_boxes = sum(len(r.boxes) for r in table.rows)
    assert n_boxes == len((folder / "BBox_List.csv").read_text().splitlines()) - 1 > 0
    res = evaluate_items(hygeia.create("diagnoser", "cnn"), table.rows, table.findings, progress=False,
                         codes=table.codes())
    loc = res["localisation"]
    assert sum(r["boxes"] for r in loc.values()) == n_boxes
    assert all(0.0 <= r["hit_rate"] <= 1.0 for r in loc.values())
    assert sum(r["hit_rate"] * r["boxes"] for r in loc.values()) >= 1  # the phantom model finds some
