"""Compiled execution (hygeia.compiled): parity with eager for every built-in diagnoser, fallback, opt-out."""
from __future__ import annotations

import logging

import hygeia
import numpy as np
import pytest
import torch
from hygeia import compiled
from hygeia.compiled import Compiled, choose, compile_plugin, uninstall

pytest.importorskip("onnxruntime")


def _images(plugin: object, n: int = 6) -> np.ndarray:
    h, w = plugin.input_size  # type: ignore[attr-defined]
    return np.random.default_rng(1).random((n, 1, h, w), dtype=np.float32)


def _diagnoser(name: str) -> object:
    names = {s.name for s in hygeia.get_registry().all("diagnoser")}
    if name not in names:
        pytest.skip(f"diagnoser {name!r} is not installed")
    return hygeia.create("diagnoser", name)


def _same_diagnoses(eager: list, fast: list) -> None:
    """Probabilities within 1e-4, the same findings present and the same regions."""
    assert len(eager) == len(fast)
    for de, dc in zip(eager, fast):
        pe = np.array([f.probability for f in de.findings])
        pc = np.array([f.probability for f in dc.findings])
        assert np.abs(pe - pc).max() <= 1e-4
        assert [f.present for f in de.findings] == [f.present for f in dc.findings]
        assert [f.region for f in de.findings] == [f.region for f in dc.findings]


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["cnn", "cxr"])
def test_compiled_matches_eager(name: str, runtime: str) -> None:
    p = _diagnoser(name)
    x = _images(p)
    eager = p.diagnose(x)  # type: ignore[attr-defined]
    res = compile_plugin(p, runtime)
    assert res == Compiled(runtime, "", {})
    assert p.net.hygeia_runtime == runtime  # type: ignore[attr-defined]
    fast = p.diagnose(x)  # type: ignore[attr-defined]
    _same_diagnoses(eager, fast)
    for de, dc in zip(eager, fast):
        for fe, fc in zip(de.findings, dc.findings):  # Grad-CAM still runs on the eager network
            assert fe.heatmap is not None and np.array_equal(fe.heatmap, fc.heatmap)


def test_compiled_path_is_used_and_eager_kept_where_needed() -> None:
    p = _diagnoser("cnn")
    x = torch.from_numpy(_images(p, 3))
    g = compiled.export(p.net, x[:1], "onnx")  # type: ignore[attr-defined]
    used: list[int] = []
    run = g.run
    g.run = lambda a: used.append(len(a[0])) or run(a)  # type: ignore[method-assign]
    compiled.install(p.net, g, "onnx")  # type: ignore[attr-defined]
    with torch.no_grad():
        p.net(x)  # type: ignore[attr-defined]
    assert used == [3]
    hooked: list[int] = []
    hook = p.net.net.layer1.register_forward_hook(lambda *a: hooked.append(1))  # type: ignore[attr-defined]
    with torch.no_grad():
        p.net(x)  # type: ignore[attr-defined]  # a hook on a submodule: eager
    hook.remove()
    assert hooked and used == [3]
    assert p.net(x).requires_grad and used == [3]  # type: ignore[attr-defined]  # gradients enabled: eager
    with torch.no_grad():
        p.net(x[:, :, :8, :8])  # type: ignore[attr-defined]  # another shape: eager
    assert used == [3]
    uninstall(p.net)  # type: ignore[attr-defined]
    assert "forward" not in vars(p.net)  # type: ignore[attr-defined]


@pytest.mark.parametrize("runtime", ["onnx"])
def test_fusion_and_its_text_encoder_compile_with_parity(runtime: str) -> None:
    from hygeia.text import load_encoder

    p = _diagnoser("fusion")
    x = _images(p, 3)
    texts = ["fever and productive cough, CRP 140", "", "ex-smoker, weight loss and haemoptysis; h/o Ca breast"]
    eager = [p.diagnose(x, texts), p.diagnose(x)]  # type: ignore[attr-defined]
    res = compile_plugin(p, runtime)
    assert res.runtime == runtime and res.reason == ""
    assert p.net.hygeia_runtime == runtime and load_encoder()[1].hygeia_runtime == runtime  # type: ignore[attr-defined]
    try:
        fast = [p.diagnose(x, texts), p.diagnose(x)]  # type: ignore[attr-defined]
    finally:
        uninstall(load_encoder()[1])  # the encoder is shared in this process
    for before, after in zip(eager, fast):
        _same_diagnoses(before, after)


class _TwoWays(torch.nn.Module):
    """Image plus optional variable-length tokens, returning a dict (the shape of a fusion network)."""

    def __init__(self) -> None:
        super().__init__()
        self.img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        self.tok = torch.nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
        y = self.img(x) * scale
        if ids is not None:
            y = y + self.tok(ids).mean(1)
        return {"logits": y, "double": 2 * y}


def test_several_ways_dynamic_axes_and_eager_fallbacks(caplog: pytest.LogCaptureFixture) -> None:
    m = _TwoWays().eval()
    x, ids = torch.rand(1, 1, 4, 4), torch.tensor([[1, 2, 3, 4, 5, 6]])
    graphs = [compiled.export(m, (x, compiled.Dynamic(ids, (1,))), "onnx"), compiled.export(m, (x, None), "onnx")]
    calls: list[int] = []
    for k, g in enumerate(graphs):
        run = g.run
        g.run = lambda a, k=k, run=run: calls.append(k) or run(a)  # type: ignore[method-assign]
    xs, ids3 = torch.rand(5, 1, 4, 4), torch.randint(0, 10, (5, 3))
    with torch.no_grad():
        want = [m(xs, ids3), m(xs), m(xs, ids3, scale=2.0)]
        compiled.install(m, graphs, "onnx")
        got = [m(xs, ids3), m(xs), m(xs, ids3, scale=2.0)]
    assert calls == [0, 1]  # scale away from its default: eager
    for w, g in zip(want, got):
        assert set(g) == {"logits", "double"} and torch.allclose(w["logits"], g["logits"], atol=1e-5)
    graphs[1].run = lambda a: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="hygeia.compiled"), torch.no_grad():
        again = m(xs)
    assert torch.allclose(again["logits"], want[1]["logits"], atol=1e-5)
    assert any("eager from now on" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


def test_unexportable_network_falls_back_with_one_logged_line(caplog: pytest.LogCaptureFixture) -> None:
    class Odd(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    class P:
        def export_module(self) -> tuple[torch.nn.Module, torch.Tensor]:
            return Odd(), torch.zeros(1, 1, 4, 4)

    with caplog.at_level(logging.INFO, logger="hygeia.compiled"):
        res = compile_plugin(P(), "onnx")
    assert res.runtime == "eager" and "not a tensor" in res.reason
    lines = [r.getMessage() for r in caplog.records if r.name == "hygeia.compiled"]
    assert len(lines) == 1 and "eager" in lines[0] and "\n" not in lines[0]


class _Tiny:
    input_size = (8, 8)

    def __init__(self) -> None:
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()


def test_opt_out_and_export_module() -> None:
    t = _Tiny()
    t.compiled = False  # type: ignore[attr-defined]
    assert compile_plugin(t, "onnx").runtime == "eager"
    assert "forward" not in vars(t.net)

    class Own(_Tiny):
        def export_module(self) -> tuple[torch.nn.Module, torch.Tensor]:
            return self.net, torch.zeros(2, 1, 8, 8)

    o = Own()
    assert compile_plugin(o, "onnx").runtime == "onnx"
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        got = o.net(x)
        uninstall(o.net)
        want = o.net(x)
    assert torch.allclose(got, want, atol=1e-5)

    class Off(_Tiny):
        def export_module(self) -> None:
            return None

    assert "opts out" in compile_plugin(Off(), "onnx").reason


def test_auto_measures_and_chooses() -> None:
    t = _Tiny()
    res = compile_plugin(t, "auto")
    assert set(res.timings) == {"eager", "onnx", "torchscript"}
    assert res.runtime == choose(res.timings)
    assert choose({"eager": [1.0, 10.0], "onnx": [0.95, 9.5]}) == "eager"  # within the margin
    assert choose({"eager": [1.0, 10.0], "onnx": [0.5, 5.0], "torchscript": [0.8, 8]}) == "onnx"


def test_threads_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.THREADS_ENV, "3")
    assert compiled.threads() == 3


def test_build_records_the_choice_and_keeps_it(tmp_path) -> None:  # noqa: ANN001
    from hygeia.serving.runtime import config_params, runtime_params

    params = {"hygeia_version": "1", "hygeia_weights_sha256": "ab", "hygeia_info": '{"input_size": [8, 8]}'}
    got = runtime_params(_Tiny(), params, "auto")
    assert got["hygeia_runtime"] in ("onnx", "torchscript", "eager") and "eager" in got["hygeia_runtime_ms"]
    kept = {**params, **got, "hygeia_runtime": "torchscript"}
    assert runtime_params(_Tiny(), params, "auto", previous=kept)["hygeia_runtime"] == "torchscript"
    forced = {**params, "hygeia_runtime": "eager", "hygeia_runtime_ms": "{}", "hygeia_runtime_reason": "eager asked for"}
    assert "eager" in runtime_params(_Tiny(), params, "auto", previous=forced)["hygeia_runtime_ms"]  # measured again
    assert runtime_params(_Tiny(), params, "onnx", device="gpu")["hygeia_runtime"] == "eager"
    cfg = tmp_path / "config.pbtxt"
    cfg.write_text('parameters {\n  key: "hygeia_runtime_ms"\n  value: { string_value: "{\\"eager\\":[1.0]}" }\n}\n')
    assert config_params(cfg) == {"hygeia_runtime_ms": '{"eager":[1.0]}'}


def _generator(name: str) -> object:
    if name not in {s.name for s in hygeia.get_registry().all("generator")}:
        pytest.skip(f"generator {name!r} is not installed")
    return hygeia.create("generator", name)


@pytest.mark.parametrize(("name", "kw"), [("diffusion", {"steps": 4}), ("vae", {}), ("gan", {})])
def test_generator_networks_compile_with_parity(name: str, kw: dict) -> None:
    g = _generator(name)
    eager = g.generate(4, condition="effusion", seed=3, **kw)  # type: ignore[attr-defined]
    res = compile_plugin(g, "onnx")
    assert res.runtime == "onnx" and res.reason == ""
    fast = g.generate(4, condition="effusion", seed=3, **kw)  # type: ignore[attr-defined]
    assert max(float(np.abs(a.pixels - b.pixels).max()) for a, b in zip(eager, fast)) <= 1e-4
    module = g.export_module()[0]  # type: ignore[attr-defined]
    assert module.hygeia_runtime == "onnx"


@pytest.mark.parametrize("name", ["molecule-vae", "phantom"])
def test_generators_without_an_exportable_network_stay_eager_and_say_why(name: str) -> None:
    res = compile_plugin(_generator(name), "auto")
    assert res.runtime == "eager" and res.reason
