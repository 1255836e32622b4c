"""Raw tritonclient calls, as a client that is not Hygeia would make them (shared by the serving tests)."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None):
    """A raw tritonclient request (what a non-Hygeia client would send)."""
    c = grpcclient.InferenceServerClient(url)
    ins = []
    for k, v in inputs.items():
        dt = "BYTES" if v.dtype == np.object_ else {"float32": "FP32", "float64": "FP64", "int64": "INT64",
                                                     "uint8": "UINT8"}[str(v.dtype)]
        t = grpcclient.InferInput(k, list(v.shape), dt)
        t.set_data_from_numpy(v)
        ins.append(t)
    outs = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return c.infer(model, ins, outputs=outs, client_timeout=60)


def raw_error(url: str, model: str, inputs: dict[str, np.ndarray]) -> InferenceServerException:
    """The server's error for a request that must fail."""
    with pytest.raises(InferenceServerException) as ei:
        infer(url, model, inputs)
    return ei.value
