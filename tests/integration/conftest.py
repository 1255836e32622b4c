"""Shared fixtures for integration tests that need a real Triton server.

``triton_server`` (session scope): a real ``tritonserver`` on free high ports serving a
repository built with ``hygeia triton build`` into a temp folder, for the quick built-in
plugins that can be built here (label conditioner, phantom generator, cnn diagnoser once its
weights exist, and the example third-party diagnoser when installed with weights). Torn down
(process group killed) at the end of the session. ``triton_models`` lists what it serves.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

# Plugins served by the shared server: fast to load; others are covered by the build tests.
SERVED = ("label", "phantom", "cnn", "example-intensity")


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    from hygeia.serving.repository import build_repository

    repo = tmp_path_factory.mktemp("triton_models")
    res = build_repository(repo, names=SERVED)
    if not res.models:
        pytest.skip(f"no servable plugin could be built: {res.failed}")
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repo: Path) -> Iterator["object"]:
    from hygeia.serving.server import TritonServer

    with TritonServer(triton_repo, threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
                      startup_timeout=180) as server:
        yield server


@pytest.fixture(scope="session")
def triton_models(triton_repo: Path) -> set[str]:
    return {d.name for d in triton_repo.iterdir() if (d / "config.pbtxt").is_file()}


@pytest.fixture
def require_model(triton_models: set[str]):  # noqa: ANN201
    """``require_model("diagnoser_cnn")`` skips the test when that model is not served."""
    def need(name: str) -> None:
        if name not in triton_models:
            pytest.skip(f"{name} not served (its plugin could not be built here, e.g. no trained weights)")
    return need
