"""The `hygeia` command as a user runs it: a subprocess, real plugins, real files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def hygeia(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "hygeia", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"hygeia {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_plugins_json_lists_builtins_and_third_party():
    rows = json.loads(hygeia("plugins", "--json").stdout)
    keys = {(r["kind"], r["name"]): r for r in rows}
    for kind, name in [("conditioner", "label"), ("generator", "phantom"), ("diagnoser", "cnn")]:
        assert keys[(kind, name)]["package"] == "hygeia"
        assert {"kind", "name", "version", "package"} <= set(keys[(kind, name)])
    assert keys[("diagnoser", "example-intensity")]["package"] == "hygeia-example-plugin"


@pytest.mark.parametrize("args, needle", [
    (["generate", "--plugin", "no-such-plugin", "-n", "2"], "unknown generator plugin 'no-such-plugin'"),
    (["generate", "--plugin", "phantom", "-n", "0"], "invalid n"),
    (["generate", "--plugin", "phantom", "-n", "2", "--condition", "fever and cough"], "condition"),
    (["generate", "--plugin", "phantom", "-n", "2", "--condition", "{not json"], "--condition"),
    (["diagnose", "--plugin", "nope", "README.md"], "unknown diagnoser plugin 'nope'"),
    (["triton", "build", "--plugin", "cnn", "--target", "docker"], "--target"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["plugins", "--jsn"], "--jsn"),
    (["diagnose", "/nonexistent/x.dcm"], "/nonexistent/x.dcm"),
    (["generate", "--plugin", "phantom", "-n", "1", "--seed", "-1"], "--seed"),
    (["train", "molecule-vae", "--option", "lr=abc"], "option lr: expected a number, got 'abc'"),
    (["train", "cnn", "--seed", "-1"], "--seed"),
    (["serve", "--repo", "/nonexistent/repo", "--device", "tpu"], "--device"),
])
def test_bad_input_is_one_line_no_traceback(args, needle):
    p = hygeia(*args, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr
    assert "Traceback" not in p.stderr


def test_generate_png_grid_marked_synthetic(tmp_path):
    out = tmp_path / "grid.png"
    hygeia("generate", "--plugin", "phantom", "-n", "4", "--seed", "3", "--condition", "effusion", "--out", str(out))
    from PIL import Image

    im = Image.open(out)
    assert im.info["Synthetic"] == "true" and "SYNTHETIC" in im.info["Description"]
    assert json.loads(im.info["Seeds"]) and json.loads(im.info["Conditions"]) == ["effusion"] * 4
    again = tmp_path / "again.png"
    hygeia("generate", "--plugin", "phantom", "-n", "4", "--seed", "3", "--condition", "effusion", "--out", str(again))
    assert out.read_bytes() == again.read_bytes()  # reproducible from the seed


def test_diagnose_dicom_json(tmp_path):
    from hygeia_lab import write_phantom_dicom

    dcm = write_phantom_dicom(tmp_path / "p.dcm", seed=5, finding="cardiomegaly")
    res = json.loads(hygeia("diagnose", str(dcm), "--json", "--png", str(tmp_path / "o.png")).stdout)
    assert len(res) == 1 and res[0]["model"]["name"] == "cxr"  # the default diagnoser
    labels = [f["label"] for f in res[0]["findings"]]
    assert labels == ["nodule", "consolidation", "effusion", "cardiomegaly", "pneumothorax"]
    assert all(0 <= f["probability"] <= 1 and f["code"]["scheme"] == "SCT" for f in res[0]["findings"])
    assert (tmp_path / "o.png").stat().st_size > 0


def test_diagnose_without_png_gives_the_same_regions(tmp_path):
    """Without --png the CLI asks for the present findings' maps only (hygeia.api.regions_options):
    the same probabilities, calls and regions as the full maps give."""
    from hygeia_lab import write_phantom_dicom

    from hygeia.api import regions_options
    from hygeia.plugins import get_registry

    assert regions_options(get_registry().create("diagnoser", "cxr")) == {"heatmaps": "present"}
    dcm = write_phantom_dicom(tmp_path / "p.dcm", seed=7, finding="effusion")
    quick = json.loads(hygeia("diagnose", str(dcm), "--json").stdout)
    full = json.loads(hygeia("diagnose", str(dcm), "--json", "--png", str(tmp_path / "o.png")).stdout)
    assert quick == full
    assert any(f["region"] is not None for f in quick[0]["findings"])


def test_diagnose_png(tmp_path):
    from hygeia_lab import make_phantom
    from hygeia.outputs import write_png

    png = write_png(tmp_path / "x.png", make_phantom(1, size=128).image)
    out = hygeia("diagnose", str(png))
    assert "cxr" in out.stdout and "nodule" in out.stdout


def test_help_for_every_command():
    for cmd in ["plugins", "generate", "diagnose", "train", "demo", "evaluate"]:
        assert "Usage" in hygeia(cmd, "--help").stdout


def test_refused_paths_and_undecodable_files_are_one_line(tmp_path):
    """An output under a file, a plugin that is not installed, a SMILES file that is not UTF-8."""
    a_file = tmp_path / "a.png"
    a_file.write_bytes(b"not a folder")
    utf16 = tmp_path / "mols.smi"
    utf16.write_text("CCO\n", encoding="utf-16")
    cases = [
        (["generate", "--plugin", "phantom", "-n", "1", "--out", str(a_file / "grid.png")], f"{a_file} is a file"),
        (["triton", "build", "--repo", str(tmp_path / "repo"), "--plugin", "nosuch"], "plugin 'nosuch'"),
        (["evaluate", "molecules", str(utf16)], "a UTF-8 text file of SMILES"),
    ]
    for args, needle in cases:
        p = hygeia(*args, check=False)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and needle in errors[0], (args, p.stderr)
        assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "repo").exists()  # refused before anything was written
