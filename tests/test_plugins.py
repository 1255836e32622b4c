"""The plugin manager, with real entry points: fake distributions written as dist-info folders."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from hygeia.errors import PluginConflictError, PluginNotFoundError
from hygeia.plugins import PluginRegistry

PLUGIN_SRC = '''
import hygeia
from hygeia.api import ModelCard, PluginSpec, TensorSpec

@hygeia.hookimpl
def hygeia_conditioners():
    yield PluginSpec(kind="conditioner", name={name!r}, version="0.1", description="test",
                     factory=dict, inputs=(TensorSpec("C", "BYTES", (1,)),),
                     outputs=(TensorSpec("E", "FP32", (4,)),),
                     model_card=ModelCard("tests", "none", limitations="none"))
'''


def make_dist(root: Path, dist: str, module: str, source: str) -> None:
    """A minimal installed distribution: module + dist-info with a `hygeia` entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[hygeia]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[mod]


def test_builtins_found_through_entry_points():
    reg = PluginRegistry()
    spec = reg.get("conditioner", "label")
    assert spec.package == "hygeia"
    assert "label" in reg.names("conditioner")


def test_third_party_plugin_registered(site):
    make_dist(site, "tp-alpha", "tp_alpha", PLUGIN_SRC.format(name="alpha"))
    reg = PluginRegistry()
    assert reg.get("conditioner", "alpha").package == "tp-alpha"


def test_same_name_twice_names_both_packages(site):
    make_dist(site, "tp-one", "tp_one", PLUGIN_SRC.format(name="twin"))
    make_dist(site, "tp-two", "tp_two", PLUGIN_SRC.format(name="twin"))
    reg = PluginRegistry()
    with pytest.raises(PluginConflictError) as e:
        reg.all()
    assert "tp-one" in str(e.value) and "tp-two" in str(e.value) and "'twin'" in str(e.value)


def test_broken_plugin_reported_others_load(site, caplog):
    make_dist(site, "tp-broken", "tp_broken", "raise RuntimeError('boom at import')\n")
    make_dist(site, "tp-fine", "tp_fine", PLUGIN_SRC.format(name="fine"))
    reg = PluginRegistry()
    failure, = [f for f in reg.failures if f.name == "tp_broken"]
    assert failure.package == "tp-broken" and "boom at import" in failure.error
    assert reg.get("conditioner", "fine")
    assert "tp_broken" in caplog.text and "boom at import" in caplog.text


def test_block_list(site, monkeypatch):
    make_dist(site, "tp-alpha", "tp_alpha", PLUGIN_SRC.format(name="alpha"))
    monkeypatch.setenv("HYGEIA_DISABLE_PLUGINS", "alpha, label")
    reg = PluginRegistry()
    assert "alpha" not in reg.names("conditioner") and "label" not in reg.names("conditioner")
    with pytest.raises(PluginNotFoundError, match="alpha"):
        reg.get("conditioner", "alpha")


def test_block_list_by_entry_point_skips_import(site, monkeypatch):
    make_dist(site, "tp-broken", "tp_broken", "raise RuntimeError('never imported')\n")
    monkeypatch.setenv("HYGEIA_DISABLE_PLUGINS", "tp_broken")
    reg = PluginRegistry()
    assert not [f for f in reg.failures if f.name == "tp_broken"]


def test_allow_list(site, monkeypatch):
    make_dist(site, "tp-alpha", "tp_alpha", PLUGIN_SRC.format(name="alpha"))
    monkeypatch.setenv("HYGEIA_PLUGINS", "alpha")
    reg = PluginRegistry()
    assert reg.names("conditioner") == ["alpha"]


def test_unknown_name_lists_available():
    reg = PluginRegistry()
    with pytest.raises(PluginNotFoundError) as e:
        reg.get("conditioner", "nope")
    assert "'nope'" in str(e.value) and "label" in str(e.value)


def test_bad_hook_result_is_an_error_naming_the_package(site):
    make_dist(site, "tp-bad", "tp_bad", textwrap.dedent('''
        import hygeia
        @hygeia.hookimpl
        def hygeia_generators():
            return ["not a spec"]
    '''))
    reg = PluginRegistry()
    with pytest.raises(TypeError, match="tp-bad"):
        reg.all()


def test_every_hook_is_documented():
    """datasette's rule: every hookspec has a docstring and a section in docs/hooks.md."""
    from hygeia import hookspecs

    docs = (Path(__file__).parents[1] / "docs" / "hooks.md").read_text()
    hooks = [n for n in dir(hookspecs) if n.startswith("hygeia_")]
    assert len(hooks) >= 5
    for name in hooks:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
        assert f"## {name}" in docs, f"{name} is not documented in docs/hooks.md"
