from __future__ import annotations

import json

import pytest
import torch

from hygeia.api import ModelCard
from hygeia.bundles import load_bundle, save_bundle, sha256_file
from hygeia.errors import BundleError

CARD = ModelCard("tests", "none", metrics={"auroc": 0.9}, limitations="none")


def test_round_trip(tmp_path):
    w = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    sha = save_bundle(tmp_path / "m", w, {"layers": 2}, CARD)
    b = load_bundle(tmp_path / "m")
    assert b.sha256 == sha == sha256_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(b.tensors["a"], w["a"]) and b.config == {"layers": 2}
    assert b.card == CARD
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "model_card.json"]


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path):
    save_bundle(tmp_path / "m", {"a": torch.zeros(2)}, {}, CARD)
    save_bundle(tmp_path / "m", {"a": torch.ones(2)}, {"v": 2}, CARD)
    assert torch.equal(load_bundle(tmp_path / "m").tensors["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_save_keeps_old_bundle(tmp_path):
    save_bundle(tmp_path / "m", {"a": torch.zeros(2)}, {}, CARD)
    with pytest.raises(TypeError):
        save_bundle(tmp_path / "m", {"a": torch.ones(2)}, {"bad": object()}, CARD)
    assert torch.equal(load_bundle(tmp_path / "m").tensors["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_missing_part_names_it(tmp_path):
    save_bundle(tmp_path / "m", {"a": torch.zeros(2)}, {}, CARD)
    (tmp_path / "m" / "model_card.json").unlink()
    with pytest.raises(BundleError, match="model_card.json"):
        load_bundle(tmp_path / "m")


def test_corrupt_weights(tmp_path):
    save_bundle(tmp_path / "m", {"a": torch.zeros(2)}, {}, CARD)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(BundleError, match="model.safetensors"):
        load_bundle(tmp_path / "m")


def test_no_pickle_anywhere_in_bundle(tmp_path):
    save_bundle(tmp_path / "m", {"a": torch.zeros(2)}, {"k": 1}, CARD)
    json.loads((tmp_path / "m" / "config.json").read_text())
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") < 10_000  # safetensors: u64 header length, not a pickle opcode
