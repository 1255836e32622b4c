"""The lead's contract-test kit, run against plugins served by a real tritonserver.

Each class is the same contract a local plugin passes (``hygeia.testing``), with the ``plugin``
fixture overridden to return ``hygeia.serving.connect(kind, name, server)``: code written against
a local plugin works unchanged against a remote one.
"""
from __future__ import annotations

from typing import Any

import pytest

from hygeia.testing import CONTRACTS

pytestmark = pytest.mark.integration
pytest.importorskip("tritonclient.grpc")

# (kind, name, Triton model) served by the session server of tests/integration/conftest.py
REMOTE = [("conditioner", "label"), ("generator", "phantom"), ("diagnoser", "cnn")]


def _remote_contract(kind: str, name: str) -> type:
    base = CONTRACTS[kind]

    @pytest.fixture
    def plugin(self: Any, triton_server: Any, require_model: Any) -> Any:
        from hygeia.serving import connect

        require_model(f"{kind}_{name}")
        return connect(kind, name, triton_server.grpc_url)

    return type(f"TestRemote_{kind}_{name}", (base,), {"plugin_name": name, "plugin": plugin})


for _kind, _name in REMOTE:
    _cls = _remote_contract(_kind, _name)
    globals()[_cls.__name__] = _cls
