"""Compiled and frozen models served by the real tritonserver: the fusion diagnoser (its network
and its text encoder) and the ``vae`` and ``diffusion`` generators are served frozen (no torch in
their stubs) and answer as the eager plugins do in this process, free-text conditions included;
generators without an exportable network record why they stay eager."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import hygeia
from hygeia_lab import make_phantom_set

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")
from hygeia.serving import connect  # noqa: E402
from hygeia.serving.repository import build_repository  # noqa: E402
from hygeia.serving.runtime import config_params  # noqa: E402
from hygeia.serving.server import TritonServer  # noqa: E402

SERVED = ("fusion", "vae", "diffusion", "molecule-vae")


@pytest.fixture(scope="module")
def compiled_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("compiled_models")
    res = build_repository(repo, names=SERVED)
    if "diagnoser_fusion" not in res.models:
        pytest.skip(f"fusion cannot be built here: {res.failed}")
    return repo


@pytest.fixture(scope="module")
def server(compiled_repo: Path) -> Iterator[TritonServer]:
    with TritonServer(compiled_repo, threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
                      startup_timeout=240) as srv:
        yield srv


def test_build_records_measured_runtimes_and_reasons(compiled_repo: Path) -> None:
    fusion = config_params(compiled_repo / "diagnoser_fusion" / "config.pbtxt")
    assert fusion["hygeia_runtime"] in ("onnx", "torchscript")  # measured faster than eager
    assert set(json.loads(fusion["hygeia_runtime_ms"])) == {"eager", "onnx", "torchscript"}
    assert fusion["hygeia_frozen"] == "hygeia_fusion._frozen:FrozenFusion"
    assert (compiled_repo / "diagnoser_fusion" / "1" / "frozen" / "fusion_text.onnx").is_file()
    encoders = [compiled_repo / m / "1" / "frozen" / sub / "encoder.onnx" for m, sub in
                (("diagnoser_fusion", "."), ("generator_vae", "text"), ("generator_diffusion", "text"))]
    assert len({e.stat().st_ino for e in encoders}) == 1  # one copy of the sentence encoder, linked
    mol = config_params(compiled_repo / "generator_molecule-vae" / "config.pbtxt")
    assert mol["hygeia_runtime"] == "eager" and "opts out" in mol["hygeia_runtime_reason"]  # says why


def test_served_fusion_matches_eager_with_and_without_text(server: TritonServer) -> None:
    remote = connect("diagnoser", "fusion", server.grpc_url)
    local = hygeia.create("diagnoser", "fusion")  # eager
    ps = make_phantom_set(3, "test", size=local.input_size[0])
    imgs = np.asarray(ps.images, np.float32)
    texts = [ps.texts[0], "", "breathless, h/o CHF, BNP 900, bilateral oedema"]
    for kw in ({"texts": texts}, {}):
        got, want = remote.diagnose(imgs, **kw), local.diagnose(imgs, **kw)
        for dr, dl in zip(got, want):
            for fr, fl in zip(dr.findings, dl.findings):
                assert fr.probability == pytest.approx(fl.probability, abs=1e-4)
                assert fr.present == fl.present and fr.region == fl.region
    # regions without maps (what the PACS gateway asks for): fusion has no "present" mode, so the
    # adapter makes every map and sends the regions alone
    only, full = remote.diagnose(imgs, texts=texts, heatmaps="regions"), remote.diagnose(imgs, texts=texts)
    assert [[f.region for f in d.findings] for d in only] == [[f.region for f in d.findings] for d in full]
    assert all(f.heatmap is None for d in only for f in d.findings)
    assert all(f.heatmap is not None for d in full for f in d.findings)
    assert any(f.region is not None for d in only for f in d.findings)
    warm = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
            if "hygeia-warm diagnoser_fusion ok" in ln]
    assert warm and all("runtime onnx (frozen graphs, no torch" in ln for ln in warm), warm  # hygeia.frozen


@pytest.mark.parametrize(("name", "n", "condition", "options"), [
    ("vae", 4, "nodule", {}),
    ("diffusion", 2, "large left pleural effusion", {"steps": 5}),
])
def test_served_generators_are_frozen_and_match_eager(server: TritonServer, name, n, condition, options) -> None:
    got = connect("generator", name, server.grpc_url).generate(n, condition=condition, seed=7, **options)
    want = hygeia.create("generator", name).generate(n, condition=condition, seed=7, **options)
    assert [g.provenance.get("label_from_text") for g in got] == [w.provenance.get("label_from_text") for w in want]
    diff = max(float(np.abs(g.pixels - w.pixels).max()) for g, w in zip(got, want))
    assert diff <= 2e-3, diff  # hygeia.frozen.IMAGE_TOLERANCE
    warm = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
            if f"hygeia-warm generator_{name} ok" in ln]
    assert warm and all("runtime onnx (frozen graphs, no torch" in ln for ln in warm), warm
