"""Hygeia plugins served by a real tritonserver: results, errors, batching, health, metrics.

No mocks: every test talks gRPC/HTTP to the server of the ``triton_server`` fixture
(tests/integration/conftest.py) or starts its own.
"""
from __future__ import annotations

import json
import os
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import hygeia
from hygeia.errors import InputError, PluginNotFoundError, UnsupportedConditionError

pytestmark = pytest.mark.integration
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from hygeia.serving import connect, wire  # noqa: E402
from hygeia.serving.repository import build_repository, is_generated  # noqa: E402
from hygeia.serving.launch import check  # noqa: E402
from triton_calls import infer as _infer, raw_error as _raw_error  # noqa: E402


# --------------------------------------------------------------------------- repository
def test_build_cpu_and_gpu_configs_from_one_template(tmp_path: Path) -> None:
    cpu = build_repository(tmp_path / "cpu", names=["label"])
    gpu = build_repository(tmp_path / "gpu", names=["label"], device="gpu")
    assert cpu.models == gpu.models == ["conditioner_label"]
    a = (tmp_path / "cpu/conditioner_label/config.pbtxt").read_text()
    b = (tmp_path / "gpu/conditioner_label/config.pbtxt").read_text()
    assert "kind: KIND_CPU" in a and "kind: KIND_GPU" in b
    # the CPU build freezes the conditioner (hygeia.frozen: onnxruntime is CPU-only here); otherwise one template
    frozen = 'parameters {\n  key: "hygeia_frozen"\n  value: { string_value: "hygeia_conditioners._frozen:FrozenLabel" }\n}\n'
    assert frozen in a and "hygeia_frozen" not in b
    assert a.replace(frozen, "").replace("KIND_CPU", "KIND_GPU").replace('"cpu"', '"gpu"') == b
    assert "dynamic_batching" in a and "TYPE_STRING" in a and "TYPE_FP32" in a
    model_py = (tmp_path / "cpu/conditioner_label/1/model.py").read_text()
    assert "hygeia.serving.adapter" in model_py and len(model_py.splitlines()) <= 3


def test_build_refreshes_and_prunes_only_its_own(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = build_repository(repo, names=["label"])
    assert first.written == ["conditioner_label"]
    again = build_repository(repo, names=["label"])
    assert again.written == [] and again.unchanged == ["conditioner_label"]
    # a stale Hygeia model (plugin gone) is removed; a foreign model is left alone
    stale = repo / "generator_uninstalled"
    (stale / "1").mkdir(parents=True)
    (stale / "config.pbtxt").write_text((repo / "conditioner_label/config.pbtxt").read_text())
    foreign = repo / "someone_elses_model"
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('name: "someone_elses_model"\nbackend: "python"\n')
    assert is_generated(stale) and not is_generated(foreign)
    build_repository(repo, kinds=("conditioner",), names=None, registry=_only_label_registry())
    assert not stale.exists() and foreign.exists() and (repo / "conditioner_label").is_dir()


def _only_label_registry():
    from hygeia.plugins import PluginRegistry

    import hygeia_conditioners

    reg = PluginRegistry(load_entry_points=False)
    reg.register(hygeia_conditioners, name="conditioners", package="hygeia")
    return reg


def test_plugin_declares_its_max_batch_size(tmp_path: Path) -> None:
    """A plugin's ``max_batch_size`` attribute sets Triton's (the cnn: 64); others get the kind's default."""
    from hygeia.serving.repository import MAX_BATCH, plan_model

    res = build_repository(tmp_path, names=["cnn", "label"])
    assert "max_batch_size: 64" in (tmp_path / "diagnoser_cnn/config.pbtxt").read_text()
    assert f"max_batch_size: {MAX_BATCH['conditioner']}" in (tmp_path / "conditioner_label/config.pbtxt").read_text()
    assert sorted(res.models) == ["conditioner_label", "diagnoser_cnn"]
    cnn = hygeia.create("diagnoser", "cnn")
    spec = hygeia.get_registry().get("diagnoser", "cnn")
    cnn.max_batch_size = 0  # an instance attribute shadows the class's
    with pytest.raises(InputError, match="max_batch_size"):
        plan_model(spec, cnn)


def test_default_instances_per_kind_and_host(tmp_path: Path) -> None:
    """CPU host: 2 stubs per diagnoser/generator (1 on one core), 1 per conditioner; GPU: 1; --instances wins."""
    from hygeia.serving.repository import default_instances

    assert [default_instances(k, "cpu", cpus=8) for k in ("diagnoser", "generator", "conditioner")] == [2, 2, 1]
    assert [default_instances(k, "cpu", cpus=1) for k in ("diagnoser", "generator", "conditioner")] == [1, 1, 1]
    assert [default_instances(k, "gpu", cpus=8) for k in ("diagnoser", "generator", "conditioner")] == [1, 1, 1]
    build_repository(tmp_path / "auto", names=["cnn", "label"])
    n = min(2, os.cpu_count() or 1)
    assert f"count: {n}\n" in (tmp_path / "auto/diagnoser_cnn/config.pbtxt").read_text()
    assert "count: 1\n" in (tmp_path / "auto/conditioner_label/config.pbtxt").read_text()
    build_repository(tmp_path / "three", names=["cnn"], instances=3)
    assert "count: 3\n" in (tmp_path / "three/diagnoser_cnn/config.pbtxt").read_text()


def test_served_diagnoser_runs_its_instances_as_separate_stubs(triton_server, require_model) -> None:
    """The shared server was built with the defaults: the cnn runs in min(2, cores) live stub processes,
    and concurrent requests are answered by them (same results as one by one)."""
    require_model("diagnoser_cnn")
    pids = triton_server.stubs()["diagnoser_cnn"]
    assert len(pids) == min(2, os.cpu_count() or 1)
    cnn = connect("diagnoser", "cnn", triton_server.grpc_url)
    imgs = np.random.default_rng(3).random((4, 1, 64, 64), dtype=np.float32)
    one_by_one = [cnn.diagnose(imgs[i:i + 1], heatmaps=False)[0] for i in range(4)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: cnn.diagnose(imgs[i:i + 1], heatmaps=False)[0], range(4)))
    for a, b in zip(one_by_one, together):
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-5)


def test_build_includes_third_party_plugins(tmp_path: Path) -> None:
    third = [s for s in hygeia.get_registry().all() if s.package not in ("hygeia", "")]
    if not third:
        pytest.skip("no third-party hygeia plugin installed (pip install -e tests/example_plugin)")
    spec = third[0]
    res = build_repository(tmp_path, names=[spec.name])
    model = wire.model_name(spec.kind, spec.name)
    if model in res.failed:
        pytest.skip(f"third-party plugin {spec.name} cannot be instantiated here: {res.failed[model]}")
    cfg = (tmp_path / model / "config.pbtxt").read_text()
    assert f'string_value: "{spec.package}"' in cfg


# --------------------------------------------------------------------------- results
def test_conditioner_same_as_local(triton_server) -> None:
    remote = connect("conditioner", "label", triton_server.grpc_url)
    local = hygeia.create("conditioner", "label")
    assert remote.identity == local.identity and remote.dim == local.dim
    conds = ["effusion", "normal", "nodule", "Effusion"]
    assert np.array_equal(remote.encode(conds).numpy(), local.encode(conds).numpy())


def test_generator_same_as_local_with_streamed_progress(triton_server, require_model) -> None:
    require_model("generator_phantom")
    remote = connect("generator", "phantom", triton_server.grpc_url)
    local = hygeia.create("generator", "phantom")
    calls: list[tuple[int, int]] = []
    got = remote.generate(3, condition="effusion", seed=11, progress=lambda d, t: calls.append((d, t)))
    want = local.generate(3, condition="effusion", seed=11)
    assert [g.pixels.tobytes() for g in got] == [w.pixels.tobytes() for w in want]
    for g, w in zip(got, want):
        assert g.synthetic and g.model == w.model and g.pixel_spacing == w.pixel_spacing
        assert g.provenance["phantom_seed"] == w.provenance["phantom_seed"]
        assert g.provenance["served_by"].endswith("/generator_phantom")
    assert calls and calls[-1] == (3, 3) and calls == sorted(calls)


def test_generator_options_travel(triton_server, require_model) -> None:
    require_model("generator_phantom")
    remote = connect("generator", "phantom", triton_server.grpc_url)
    got = remote.generate(1, condition="nodule", seed=3, size=128)
    want = hygeia.create("generator", "phantom").generate(1, condition="nodule", seed=3, size=128)
    assert got[0].pixels.shape == (1, 128, 128) and np.array_equal(got[0].pixels, want[0].pixels)


def test_diagnoser_same_as_local(triton_server, require_model) -> None:
    require_model("diagnoser_cnn")
    remote = connect("diagnoser", "cnn", triton_server.grpc_url)
    local = hygeia.create("diagnoser", "cnn")
    assert remote.identity == local.identity
    assert remote.findings == tuple(local.findings) and remote.input_size == tuple(local.input_size)
    imgs = np.stack([g.pixels for g in hygeia.create("generator", "phantom").generate(3, "effusion", seed=2)])
    r, lo = remote.diagnose(imgs, heatmaps=True), local.diagnose(imgs, heatmaps=True)
    for dr, dl in zip(r, lo):
        assert dr.model == dl.model and dr.image_size == dl.image_size
        for fr, fl in zip(dr.findings, dl.findings):
            assert (fr.label, fr.code, fr.threshold) == (fl.label, fl.code, fl.threshold)
            assert fr.probability == pytest.approx(fl.probability, abs=1e-4)  # served compiled, local eager
            assert fr.present == fl.present and fr.region == fl.region
            assert fr.heatmap is not None and np.allclose(fr.heatmap, fl.heatmap, atol=1e-4)
    fast = remote.diagnose(imgs, heatmaps=False)
    assert all(f.heatmap is None for d in fast for f in d.findings)
    assert "present" in remote.heatmap_modes  # what the PACS gateway asks for: the present findings' maps
    some_r, some_l = remote.diagnose(imgs, heatmaps="present"), local.diagnose(imgs, heatmaps="present")
    for dr, dl in zip(some_r, some_l):
        for fr, fl in zip(dr.findings, dl.findings):
            assert fr.present == fl.present and fr.region == fl.region
            assert (fr.heatmap is None) == (not fl.present) == (fl.heatmap is None)
            if fr.heatmap is not None:
                assert np.allclose(fr.heatmap, fl.heatmap, atol=1e-4)
    assert {f.heatmap is None for d in some_r for f in d.findings} == {True, False}
    # what the PACS gateway asks a remote diagnoser for: the same regions, and no map on the wire
    only = remote.diagnose(imgs, heatmaps="regions")
    assert [[(f.probability, f.present, f.region) for f in d.findings] for d in only] == \
        [[(f.probability, f.present, f.region) for f in d.findings] for d in some_r]
    assert all(f.heatmap is None for d in only for f in d.findings)
    assert any(f.region is not None for d in only for f in d.findings)
    with pytest.raises(InputError, match="heatmaps: expected None, True, False, 'present' or 'regions', got 'some'"):
        remote.diagnose(imgs, heatmaps="some")


def test_served_diagnoser_runs_compiled_as_its_config_records(triton_server, triton_repo: Path, require_model) -> None:
    from hygeia.serving.runtime import config_params

    require_model("diagnoser_cnn")
    params = config_params(triton_repo / "diagnoser_cnn" / "config.pbtxt")
    assert params["hygeia_runtime"] in ("onnx", "torchscript", "eager")
    assert set(json.loads(params["hygeia_runtime_ms"])) >= {"eager"}
    warm = [ln for ln in triton_server.log_path.read_text(errors="replace").splitlines()
            if "hygeia-warm diagnoser_cnn ok" in ln]
    assert warm and all(f"runtime {params['hygeia_runtime']}" in ln for ln in warm), warm


# --------------------------------------------------------------------------- bad input
def test_bad_conditions_named_and_server_keeps_serving(triton_server) -> None:
    url = triton_server.grpc_url
    good = {"CONDITION": wire.encode_strings(["effusion"])}
    cases = {
        "empty prompt": (wire.encode_strings([""]), "condition"),
        "100 kB prompt": (wire.encode_strings(["x" * 100_000]), "at most 16384 bytes"),
        "not UTF-8": (np.array([[b"\xff\xfe"]], dtype=np.object_), "UTF-8"),
        "unknown label": (wire.encode_strings(["tumour"]), "label"),
    }
    for what, (value, expect) in cases.items():
        e = _raw_error(url, "conditioner_label", {"CONDITION": value})
        assert e.status() == "StatusCode.INVALID_ARGUMENT", what
        assert "Error: invalid" in e.message() and expect in e.message(), (what, e.message())
        assert _infer(url, "conditioner_label", good).as_numpy("EMBEDDING").shape == (1, 32)
    e = _raw_error(url, "conditioner_label", {"CONDITION": np.ones((1, 1), np.float32)})
    assert "CONDITION" in e.message() and "TYPE_STRING" in e.message() or "BYTES" in e.message()


def test_bad_images_named_and_server_keeps_serving(triton_server, require_model) -> None:
    require_model("diagnoser_cnn")
    url, m = triton_server.grpc_url, "diagnoser_cnn"
    good = np.full((1, 1, 64, 64), 0.5, np.float32)
    nan = good.copy()
    nan[0, 0, 3, 3] = np.nan
    e = _raw_error(url, m, {"IMAGES": nan})
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "IMAGES" in e.message() and "NaN" in e.message()
    e = _raw_error(url, m, {"IMAGES": np.zeros((1, 1, 32, 32), np.float32)})
    assert "IMAGES" in e.message() and "shape" in e.message()
    e = _raw_error(url, m, {"IMAGES": good.astype(np.float64)})
    assert "IMAGES" in e.message() and ("FP64" in e.message() or "data-type" in e.message())
    e = _raw_error(url, m, {"IMAGES": good, "TEXTS": wire.encode_strings(["a" * 100_000])})
    assert "TEXTS" in e.message() and "16384" in e.message()
    out = _infer(url, m, {"IMAGES": good}, ["PROBS"]).as_numpy("PROBS")
    assert out.shape == (1, 5) and np.isfinite(out).all()


def test_unknown_model(triton_server) -> None:
    e = _raw_error(triton_server.grpc_url, "diagnoser_nope", {"IMAGES": np.zeros((1, 1, 64, 64), np.float32)})
    assert "diagnoser_nope" in e.message()
    with pytest.raises(PluginNotFoundError, match="nope") as ei:
        connect("diagnoser", "nope", triton_server.grpc_url)
    assert ei.value.available is not None


def test_remote_errors_are_hygeia_errors_with_server_message(triton_server) -> None:
    remote = connect("conditioner", "label", triton_server.grpc_url)
    with pytest.raises(UnsupportedConditionError) as ei:
        remote.encode(["tumour"])
    local = hygeia.create("conditioner", "label")
    with pytest.raises(UnsupportedConditionError) as li:
        local.encode(["tumour"])
    assert str(ei.value) == str(li.value) and ei.value.name == li.value.name
    with pytest.raises(InputError, match="16384 bytes"):
        remote.encode(["x" * 100_000])
    assert remote.encode(["normal"]).shape == (1, 32)


def test_bad_request_in_a_dynamic_batch_fails_alone(triton_server) -> None:
    """Concurrent requests land in one dynamic batch: only the bad one fails."""
    url = triton_server.grpc_url
    results: dict[int, object] = {}

    def send(i: int) -> None:
        cond = "tumour" if i == 3 else ["effusion", "normal", "nodule"][i % 3]
        try:
            results[i] = _infer(url, "conditioner_label", {"CONDITION": wire.encode_strings([cond])}).as_numpy("EMBEDDING")
        except InferenceServerException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[3], InferenceServerException)
    assert all(isinstance(results[i], np.ndarray) for i in results if i != 3)


def test_bad_generator_requests(triton_server, require_model) -> None:
    require_model("generator_phantom")
    url = triton_server.grpc_url
    remote = connect("generator", "phantom", url)
    with pytest.raises(InputError, match="size"):  # checked by the plugin, on the server
        remote.generate(1, condition="normal", seed=0, size=17)
    with pytest.raises(UnsupportedConditionError):
        remote.generate(1, condition=12345, seed=0)
    assert len(remote.generate(1, condition="normal", seed=0)) == 1


# --------------------------------------------------------------------------- health, metrics, CLI
def test_readiness_metrics_and_check(triton_server, triton_models) -> None:
    live, ready, states = check(triton_server.grpc_url)
    assert live and ready
    assert {s.name for s in states} == triton_models and all(s.state == "READY" for s in states)
    with urllib.request.urlopen(triton_server.http_url + "/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    connect("conditioner", "label", triton_server.grpc_url).encode(["normal"])
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="conditioner_label"' in text


def test_serve_check_command(triton_server) -> None:
    from typer.testing import CliRunner
    import typer

    from hygeia.serving.cli import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["serve", "--check", triton_server.grpc_url])
    assert res.exit_code == 0, res.output
    assert "conditioner_label" in res.output and "READY" in res.output
    from hygeia.serving.server import free_port

    res = CliRunner().invoke(app, ["serve", "--check", f"127.0.0.1:{free_port()}", "--timeout", "2"])
    assert res.exit_code != 0
