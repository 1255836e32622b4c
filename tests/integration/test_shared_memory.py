"""Images to a local tritonserver through system shared memory (hygeia.serving.shm), real server."""
from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import hygeia
from hygeia.errors import InputError

pytestmark = pytest.mark.integration
grpcclient = pytest.importorskip("tritonclient.grpc")

from hygeia.serving import connect  # noqa: E402
from hygeia.serving.connection import Connection  # noqa: E402
from hygeia.serving.shm import MIN_BYTES, wanted  # noqa: E402


def _images(n: int) -> np.ndarray:
    return np.stack([g.pixels for g in hygeia.create("generator", "phantom").generate(n, "effusion", seed=4)])


def _regions(url: str) -> dict[str, dict]:
    """The shared memory regions the server has registered, by name."""
    st = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return dict(st.get("regions", {}))


def _ours(url: str) -> set[str]:
    return {k for k in _regions(url) if k.startswith(f"hygeia-{os.getpid()}-")}


def _probs(diagnoses) -> list[float]:
    return [f.probability for d in diagnoses for f in d.findings]


def _first_call(url: str, imgs: np.ndarray):
    """A client with shared memory, its first result, and the one region that call registered."""
    before = _ours(url)
    remote = connect("diagnoser", "cnn", url, shared_memory=True)
    result = remote.diagnose(imgs, heatmaps=False)
    (name,) = _ours(url) - before
    return remote, result, name


def test_auto_is_on_for_a_loopback_address_without_tls_only() -> None:
    assert wanted("auto", "127.0.0.1", False) and wanted("auto", "localhost", False) and wanted("auto", "::1", False)
    assert not wanted("auto", "10.1.2.3", False) and not wanted("auto", "127.0.0.1", True)
    assert wanted(True, "triton.example.org", False) and not wanted(False, "127.0.0.1", False)
    assert Connection("127.0.0.1:8001").shared_memory and not Connection("pacs-ai:8001").shared_memory
    assert not Connection("grpcs://127.0.0.1:8001").shared_memory
    with pytest.raises(InputError, match="shared_memory"):
        Connection("127.0.0.1:8001", shared_memory="yes")


def test_images_through_shared_memory_give_the_wire_results(triton_server, require_model) -> None:
    require_model("diagnoser_cnn")
    url = triton_server.grpc_url
    imgs = _images(6)
    assert imgs.astype(np.float32).nbytes >= MIN_BYTES  # large enough to take the region
    before = _ours(url)
    shared = connect("diagnoser", "cnn", url, shared_memory=True)
    wire = connect("diagnoser", "cnn", url, shared_memory=False)
    a = shared.diagnose(imgs, heatmaps=True)
    regions = _ours(url) - before
    assert len(regions) == 1, regions  # one region for this client, registered with the server
    assert wire.diagnose(imgs[:1], heatmaps=False) and _ours(url) - before == regions  # the wire one adds none
    b = wire.diagnose(imgs, heatmaps=True)
    for da, db in zip(a, b):
        for fa, fb in zip(da.findings, db.findings):
            assert fa.probability == fb.probability and fa.region == fb.region
            assert np.array_equal(fa.heatmap, fb.heatmap)
    # the region is reused, call after call, and freed with its client
    name = regions.pop()
    shared.diagnose(imgs[::-1], heatmaps=False)
    assert _ours(url) - before == {name} and Path(f"/dev/shm/{name}").exists()
    del shared
    gc.collect()
    assert name not in _regions(url) and not Path(f"/dev/shm/{name}").exists()


def test_the_region_grows_for_a_larger_batch(triton_server, require_model) -> None:
    require_model("diagnoser_cnn")
    url = triton_server.grpc_url
    imgs = _images(12)
    remote, small, name = _first_call(url, imgs[:6])
    regions = _ours(url)
    size = int(_regions(url)[name]["byte_size"])
    assert size == imgs[:6].astype(np.float32).nbytes
    large = remote.diagnose(imgs, heatmaps=False)  # twice the bytes: the region is made again, larger
    assert _ours(url) == regions and int(_regions(url)[name]["byte_size"]) >= imgs.astype(np.float32).nbytes
    assert _probs(large[:6]) == pytest.approx(_probs(small), abs=1e-6)  # another batch size


def test_a_registration_the_server_lost_is_made_again(triton_server, require_model) -> None:
    require_model("diagnoser_cnn")
    url = triton_server.grpc_url
    imgs = _images(6)
    remote, first, name = _first_call(url, imgs)
    grpcclient.InferenceServerClient(url).unregister_system_shared_memory(name)  # as after a server restart
    again = remote.diagnose(imgs, heatmaps=False)
    assert _probs(again) == _probs(first)
    assert name in _regions(url)


def test_a_region_the_server_refuses_sends_on_the_wire(triton_server, require_model, caplog) -> None:
    require_model("diagnoser_cnn")
    url = triton_server.grpc_url
    imgs = _images(6)
    expect = connect("diagnoser", "cnn", url, shared_memory=False).diagnose(imgs, heatmaps=False)
    remote = connect("diagnoser", "cnn", url, shared_memory=True)
    conn = remote.conn
    conn.client()  # this thread's client and its region (not yet created)
    taken = conn._local.shared.name
    other = grpcclient.InferenceServerClient(url)  # another owner already holds that name on the server
    from tritonclient.utils import shared_memory as shm

    h = shm.create_shared_memory_region(taken + "-x", f"/{taken}-x", 4096)
    try:
        other.register_system_shared_memory(taken, f"/{taken}-x", 4096)
        with caplog.at_level(logging.INFO, logger="hygeia.serving"):
            got = remote.diagnose(imgs, heatmaps=False)
            remote.diagnose(imgs, heatmaps=False)
        assert _probs(got) == _probs(expect)
        lines = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
        assert len(lines) == 1 and "images go over gRPC" in lines[0], lines  # said once, then on the wire
        assert "\n" not in lines[0] and not conn._local.shared.enabled
    finally:
        other.unregister_system_shared_memory(taken)
        shm.destroy_shared_memory_region(h)
