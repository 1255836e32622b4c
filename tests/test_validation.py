from __future__ import annotations

import numpy as np
import pytest
import torch

from hygeia.errors import InputError, UnsupportedConditionError
from hygeia.validation import check_condition, check_images, check_n, check_texts, condition_kind
from hygeia.vocab import FINDINGS, finding, finding_index


def test_images_shapes_normalised():
    assert check_images(np.zeros((8, 8), np.float32), size=(8, 8)).shape == (1, 1, 8, 8)
    assert check_images(np.zeros((3, 8, 8)), size=(8, 8)).shape == (3, 1, 8, 8)
    assert check_images(torch.zeros(2, 1, 8, 8), size=(8, 8)).dtype == np.float32
    rgb = np.zeros((2, 3, 8, 8), np.float32)
    rgb[:, 0] = 1.0
    assert check_images(rgb, size=(8, 8))[0, 0, 0, 0] == pytest.approx(0.299)


@pytest.mark.parametrize("arr, msg", [
    (np.zeros((1, 1, 9, 8), np.float32), "8x8"),
    (np.zeros((1, 1, 8, 8), np.uint8), "floating"),
    (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN"),
    (np.zeros((1, 2, 8, 8), np.float32), "channel"),
    (np.zeros((0, 1, 8, 8), np.float32), "at least one"),
    ("x.png", "numpy array"),
])
def test_images_rejected_with_reason(arr, msg):
    with pytest.raises(InputError, match="images") as e:
        check_images(arr, size=(8, 8))
    assert msg in str(e.value)


@pytest.mark.parametrize("n", [0, -3, 1.5, "2", None, True, 10**9])
def test_bad_n(n):
    with pytest.raises(InputError, match="invalid n"):
        check_n(n)


def test_texts():
    assert check_texts(None, 2) is None
    with pytest.raises(InputError, match="texts"):
        check_texts(["a"], 2)


def test_condition_kinds():
    assert condition_kind(None) == condition_kind("  ") == "none"
    assert condition_kind("Effusion") == "label"
    assert condition_kind("fever and cough") == "text"
    assert condition_kind({"logP": 1}) == "properties"
    with pytest.raises(UnsupportedConditionError, match="'gan'"):
        check_condition("free text", {"label", "none"}, "gan")


def test_vocab():
    assert finding("pleural effusion").code.value == "60046008"
    assert [f.code.scheme for f in FINDINGS] == ["SCT"] * 5
    assert finding_index("cardiomegaly") == 3
    with pytest.raises(InputError, match="finding label"):
        finding("tumour-ish")
