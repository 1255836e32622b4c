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


def test_texts_that_are_not_utf8_are_refused():
    # undecodable bytes on a command line reach Python as lone surrogates
    with pytest.raises(InputError, match="UTF-8 text"):
        check_texts(["\udcff\udcfe breathless"], 1)


def test_option_values_have_their_defaults_kind():
    from hygeia.validation import check_option_values

    defaults = {"lr": 1e-3, "epochs": 5, "augment": False, "mode": "avg", "arch": {"blocks": [2]}, "init": None}
    check_option_values({"lr": 1, "epochs": 2, "augment": True, "mode": "max", "arch": {}, "init": "x",
                         "unknown": object()}, defaults)  # ints for floats, None defaults and unknown keys pass
    for key, value, kind in [("lr", "abc", "a number"), ("epochs", True, "a number"), ("augment", 1, "true or false"),
                             ("mode", 3, "text"), ("arch", "bogus", "a JSON object")]:
        with pytest.raises(InputError, match=f"option {key}: expected {kind}"):
            check_option_values({key: value}, defaults)


def test_server_addresses_are_checked_once_for_clients_and_the_gateway():
    from hygeia.serving.connection import Connection, split_server

    assert split_server("grpcs://triton.local:8001/") == ("triton.local:8001", True)
    assert split_server("[::1]:8001") == ("[::1]:8001", False)
    for bad in ("triton", "triton:grpc", ":8001"):
        with pytest.raises(InputError, match="invalid server: expected HOST:PORT"):
            Connection(bad)
        with pytest.raises(InputError, match="invalid gateway config server: expected HOST:PORT"):
            split_server(bad, "gateway config server")


@pytest.mark.parametrize("device, expected", [
    ("tpu", "cpu, cuda, cuda:N or mps"), ("meta", "cpu, cuda, cuda:N or mps"),
    ("cuda:99", "cuda:0 to" if torch.cuda.is_available() else "cpu .this machine has no CUDA device"),
])
def test_devices_this_machine_lacks_are_refused(device, expected):
    from hygeia.bundles import pick_device

    with pytest.raises(InputError, match="invalid device: expected " + expected):
        pick_device(device)
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            pick_device("cuda")
