"""The serving wire format (hygeia.serving.wire) round-trips results exactly; no server needed."""
from __future__ import annotations

import numpy as np
import pytest

from hygeia.api import Diagnosis, Finding, GeneratedImage, GeneratedMolecule, ModelIdentity, Region
from hygeia.errors import InputError, UnsupportedConditionError
from hygeia.serving import wire
from hygeia.vocab import FINDING_LABELS, finding

IDENT = ModelIdentity("cnn", "1.0.0", "diagnoser", "ab" * 32)


def _diagnosis(heat: bool, seed: int) -> Diagnosis:
    rng = np.random.default_rng(seed)
    fs = []
    for i, lab in enumerate(FINDING_LABELS):
        region = Region("box", ((1.0, 2.0), (10.5, 12.0))) if i == 1 else (
            Region("polyline", ((0, 0), (4, 0), (4, 4), (0, 0))) if i == 2 else None)
        fs.append(Finding(lab, finding(lab).code, float(rng.random()), 0.4 + 0.1 * i, region,
                          rng.random((8, 8)).astype(np.float32) if heat and i != 3 else None))
    return Diagnosis(fs, IDENT, (8, 8))


@pytest.mark.parametrize("heat", [True, False])
def test_diagnoses_round_trip(heat: bool) -> None:
    ds = [_diagnosis(heat, s) for s in range(3)]
    out = wire.encode_diagnoses(ds, FINDING_LABELS, heatmaps=True)
    assert out[wire.PROBS].shape == (3, 5) and out[wire.PROBS].dtype == np.float32
    assert out[wire.HEATMAPS].shape == ((3, 5, 8, 8) if heat else (3, 5, 0, 0))
    back = wire.decode_diagnoses(out, FINDING_LABELS, IDENT, (8, 8))
    for a, b in zip(ds, back):
        assert a.model == b.model and a.image_size == b.image_size
        for fa, fb in zip(a.findings, b.findings):
            assert (fa.label, fa.code, fa.region) == (fb.label, fb.code, fb.region)
            assert fb.probability == pytest.approx(fa.probability, abs=1e-6)
            assert fb.threshold == pytest.approx(fa.threshold, abs=1e-6)
            assert (fa.heatmap is None) == (fb.heatmap is None)
            if fa.heatmap is not None:
                assert np.array_equal(fa.heatmap, fb.heatmap)


def test_missing_finding_is_left_out() -> None:
    d = _diagnosis(False, 0)
    d.findings = d.findings[:2]
    back = wire.decode_diagnoses(wire.encode_diagnoses([d], FINDING_LABELS), FINDING_LABELS, IDENT, (8, 8))
    assert [f.label for f in back[0].findings] == list(FINDING_LABELS[:2])


def test_generated_round_trip() -> None:
    gid = ModelIdentity("phantom", "1.0.0", "generator", None)
    imgs = [GeneratedImage(np.full((1, 4, 4), i / 4, np.float32), (0.5, 0.5), "DX", 3, "effusion", gid,
                           {"index": i, "np": np.int64(2)}) for i in range(2)]
    out = wire.encode_generated(imgs)
    assert out[wire.IMAGES].shape == (1, 2, 1, 4, 4) and out[wire.META].shape == (1, 2)
    back = wire.decode_generated(out, served_by="triton://x")
    for a, b in zip(imgs, back):
        assert np.array_equal(a.pixels, b.pixels) and b.synthetic
        assert (a.pixel_spacing, a.modality, a.seed, a.condition, a.model) == (b.pixel_spacing, b.modality, b.seed,
                                                                                b.condition, b.model)
        assert b.provenance["index"] == a.provenance["index"] and b.provenance["served_by"] == "triton://x"
    mols = [GeneratedMolecule("CCO", True, 1, {"logP": 1.0}, gid, {"qed": 0.4}),
            GeneratedMolecule("C1CC", False, 1, {"logP": 1.0}, gid)]
    back = wire.decode_generated(wire.encode_generated(mols))
    assert [(m.smiles, m.valid, m.condition, m.properties) for m in back] == \
        [(m.smiles, m.valid, m.condition, m.properties) for m in mols]


def test_conditions_and_strings() -> None:
    for c in (None, "effusion", "a free { text", {"logP": 2.5, "QED": 0.7}):
        assert wire.decode_condition(wire.encode_condition(c)) == c
    with pytest.raises(UnsupportedConditionError):
        wire.encode_condition(12345)
    assert wire.decode_strings(wire.encode_strings(["é", ""]), "T") == ["é", ""]
    with pytest.raises(InputError, match=r"T\[0\].*at most 10 bytes"):
        wire.decode_strings(wire.encode_strings(["x" * 11]), "T", max_bytes=10)
    with pytest.raises(InputError, match="UTF-8"):
        wire.decode_strings(np.array([[b"\xff"]], dtype=np.object_), "T")
