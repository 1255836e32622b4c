"""The ``gan`` generator: conditioning through label and text conditioners, seeds, input checks,
and a reproducible (tiny) training run. The contract kit runs in tests/contract."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from hygeia.api import GeneratedImage
from hygeia.bundles import load_bundle
from hygeia.errors import InputError, UnsupportedConditionError
from hygeia.plugins import get_registry
from hygeia.testing import GeneratorContract

pytest.importorskip("hygeia_gan")
from hygeia_gan._sampling import MAX_N  # noqa: E402
from hygeia_gan.plugin import WEIGHTS, GanGenerator  # noqa: E402
from hygeia_gan.train import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A label-only GAN trained for one short epoch (seconds), twice from the same seed."""
    d = tmp_path_factory.mktemp("gan")
    kw = dict(n_per_condition=8, epochs=1, batch_size=8, conditioners="label", g_ch=8, d_ch=8, classifier_steps=3,
              cache=d / "data.npz", samples=d / "samples", progress=False)
    a = train(out=d / "a", seed=3, checkpoint=d / "ck_a", **kw)
    b = train(out=d / "b", seed=3, checkpoint=None, **kw)
    c = train(out=d / "c", seed=4, checkpoint=None, **kw)
    return d, a, b, c


def test_resume_equals_uninterrupted(tiny):
    d = tiny[0]
    kw = dict(n_per_condition=8, batch_size=8, conditioners="label", g_ch=8, d_ch=8, classifier_steps=3, cache=d / "data.npz",
              samples=None, progress=False, seed=3)
    straight = train(out=d / "two", epochs=2, checkpoint=None, **kw)
    resumed = train(out=d / "a_resumed", epochs=2, checkpoint=d / "ck_a", resume=True, **kw)  # continues run "a"
    assert load_bundle(resumed).sha256 == load_bundle(straight).sha256
    assert json.loads((resumed / "config.json").read_text())["epochs"] == 2
    with pytest.raises(InputError, match="resume"):
        train(out=d / "x", epochs=2, checkpoint=d / "ck_a", resume=True, **{**kw, "seed": 5})
    with pytest.raises(InputError, match="resume"):
        train(out=d / "x", epochs=2, checkpoint=d / "nothing-here", resume=True, **kw)


def test_training_is_reproducible(tiny):
    d, a, b, c = tiny
    assert load_bundle(a).sha256 == load_bundle(b).sha256, "same seed, same weights"
    assert load_bundle(a).sha256 != load_bundle(c).sha256
    assert (d / "samples" / "epoch_001.png").stat().st_size > 1000, "a PNG grid per epoch"
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["epochs"] == 1 and list(cfg["conditioners"]) == ["label"] and cfg["seed"] == 3



def test_init_starts_the_generator_from_a_bundle(tiny):
    """A second stage starts G from a bundle's weights (D fresh) and records which bundle."""
    from hygeia_gan.model import Generator
    from hygeia_gan.train import _load_init

    d, a = tiny[0], tiny[1]
    kw = dict(n_per_condition=8, batch_size=8, conditioners="label", d_ch=8, classifier_steps=3, cache=d / "data.npz", samples=None,
              progress=False, seed=3, checkpoint=None, epochs=1)
    cfg = json.loads((a / "config.json").read_text())
    dims = {k: v["dim"] for k, v in cfg["conditioners"].items()}
    g = Generator(dims, z_dim=cfg["z_dim"], embed_dim=cfg["embed_dim"], ch=8)
    assert _load_init(a, g) == load_bundle(a).sha256
    assert all(torch.equal(v, load_bundle(a).tensors[k]) for k, v in g.state_dict().items())
    staged = train(out=d / "staged", init=a, g_ch=8, **kw)
    assert json.loads((staged / "config.json").read_text())["init_weights_sha256"] == load_bundle(a).sha256
    assert load_bundle(staged).sha256 != load_bundle(train(out=d / "fresh", g_ch=8, **kw)).sha256
    with pytest.raises(InputError, match="init"):
        train(out=d / "x", init=a, g_ch=16, **kw)

def test_label_only_model_rejects_text_and_unknown_labels(tiny):
    g = GanGenerator(tiny[1], device="cpu")
    assert g.condition_kinds == frozenset({"none", "label"})
    with pytest.raises(UnsupportedConditionError, match="condition"):
        g.generate(1, condition="not-a-finding-label-xyz")
    with pytest.raises(UnsupportedConditionError):
        g.generate(1, condition="chest radiograph with a pleural effusion")
    assert g.generate(1, condition="Pneumothorax")[0].provenance["conditioner"] == "label"


class TestTinyGanContract(GeneratorContract):
    """The contract kit on a freshly trained bundle (the shipped one is checked in tests/contract)."""

    plugin_name = "gan"

    @pytest.fixture
    def plugin(self, tiny):
        return GanGenerator(tiny[1], device="cpu")


@pytest.fixture(scope="module")
def gan():
    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped gan weights (run `hygeia train gan`)")
    return get_registry().create("generator", "gan")


def test_shipped_bundle_small_and_conditioned_two_ways(gan):
    assert (WEIGHTS / "model.safetensors").stat().st_size < 20e6
    assert {"none", "label", "text"} <= gan.condition_kinds
    lab = gan.generate(2, condition="effusion", seed=1)
    txt = gan.generate(2, condition="chest radiograph with a pleural effusion", seed=1)
    unc = gan.generate(2, condition=None, seed=1)
    assert [r.provenance["conditioner"] for r in (lab[0], txt[0], unc[0])] == ["label", "text", None]
    for r in lab + txt + unc:
        assert isinstance(r, GeneratedImage) and r.synthetic and r.pixels.shape == (1, 64, 64)
        assert r.modality == "DX" and r.pixel_spacing[0] == pytest.approx(350 / 64)
    # same noise, different condition: the condition changes the image
    assert not np.allclose(lab[0].pixels, unc[0].pixels, atol=1e-3)
    assert not np.allclose(lab[0].pixels, gan.generate(1, condition="cardiomegaly", seed=1)[0].pixels, atol=1e-3)


def test_prefix_property_and_batching(gan):
    a = gan.generate(5, condition="nodule", seed=11, batch_size=2)
    b = gan.generate(3, condition="nodule", seed=11)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.pixels, y.pixels, atol=1e-5)
    assert [r.provenance["index"] for r in a] == [0, 1, 2, 3, 4]


def test_truncation_reduces_spread(gan):
    free = np.stack([r.pixels for r in gan.generate(32, condition="normal", seed=2)])
    trunc = np.stack([r.pixels for r in gan.generate(32, condition="normal", seed=2, truncation=0.5)])
    assert trunc.std(0).mean() < free.std(0).mean()


@pytest.mark.parametrize("kwargs,name", [
    (dict(n=MAX_N + 1), "n"), (dict(n=2, truncation=0.1), "truncation"), (dict(n=2, truncation=9), "truncation"),
    (dict(n=2, batch_size=0), "batch_size"), (dict(n=2, steps=3), "options"),
    (dict(n=2, guidance_scale=21.0), "guidance_scale"), (dict(n=2, guidance_scale=float("nan")), "guidance_scale"),
    (dict(n=2, guidance_scale="3"), "guidance_scale"), (dict(n=2, negative_condition=3), "negative_condition"),
    (dict(n=2, condition="nodule", negative_condition={"logP": 1.0}), "negative_condition"),
    (dict(n=2, seed=-1), "seed"), (dict(n=2, condition={"logP": 2.0}), "condition"),
])
def test_bad_input_before_work(gan, kwargs, name):
    with pytest.raises(InputError, match=name):
        gan.generate(**kwargs)
    assert len(gan.generate(1, condition="effusion")) == 1  # still works


def test_guidance_in_embedding_space(gan):
    """``base + s * (c - base)``: scale 0 gives the negative condition's image (same noise), scale 1
    the unguided one; the shipped default guides findings away from ``normal`` (scale 3) and
    leaves ``normal`` and the null condition alone."""
    def px(cond, **kw):
        return np.stack([r.pixels for r in gan.generate(3, condition=cond, seed=5, **kw)])

    guided = gan.generate(3, condition="effusion", seed=5)
    assert guided[0].provenance["guidance_scale"] == 3.0 and guided[0].provenance["negative_condition"] == "normal"
    unguided = px("effusion", guidance_scale=1)
    assert not np.allclose(np.stack([r.pixels for r in guided]), unguided, atol=1e-3)
    np.testing.assert_allclose(px("effusion", guidance_scale=0), px("normal"), atol=1e-5)
    np.testing.assert_allclose(px("effusion", guidance_scale=0, negative_condition="none"), px(None), atol=1e-5)
    np.testing.assert_allclose(px("effusion", guidance_scale=0, negative_condition="cardiomegaly"),
                               px("cardiomegaly", guidance_scale=1), atol=1e-5)
    for cond in ("normal", None):  # never guided away from itself; the null condition has nothing to guide
        r = gan.generate(1, condition=cond, seed=5, guidance_scale=4)[0]
        assert r.provenance["guidance_scale"] == 1.0 and r.provenance["negative_condition"] is None
    # a text prompt is guided away from the label 'normal' through the other conditioner
    txt = gan.generate(1, condition="chest radiograph with a pleural effusion", seed=5)[0]
    assert txt.provenance["conditioner"] == "text" and txt.provenance["negative_condition"] == "normal"
    assert not np.allclose(txt.pixels, px("chest radiograph with a pleural effusion", guidance_scale=1)[0], atol=1e-3)


def test_guidance_makes_the_judge_see_nodules(gan):
    """The reason for the default: unguided nodules are too faint for the cnn judge (about 1 in 4
    found at n=200); guided away from 'normal' they are found far more often."""
    judge = get_registry().create("diagnoser", "cnn", heatmaps=False, device="cpu")
    from hygeia_lab.evaluation.generators import judge_probabilities
    from hygeia.vocab import FINDING_LABELS

    k = FINDING_LABELS.index("nodule")
    hits = {}
    for s in (1.0, 3.0):
        x = np.stack([r.pixels for r in gan.generate(48, condition="nodule", seed=9, guidance_scale=s)])
        p, thr = judge_probabilities(judge, x)
        hits[s] = float((p[:, k] >= thr[k]).mean())
    assert hits[3.0] >= hits[1.0] + 0.25, hits


def test_sampling_defaults_recorded_and_optional(tiny, tmp_path):
    """The trainer records the sampling defaults; a bundle without them samples unguided."""
    cfg = json.loads((tiny[1] / "config.json").read_text())
    assert cfg["sampling"] == {"guidance_scale": 3.0, "negative_condition": "normal"}
    old = tmp_path / "old"
    old.mkdir()
    for f in tiny[1].iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    del cfg["sampling"]
    (old / "config.json").write_text(json.dumps(cfg))
    r = GanGenerator(bundle=old, device="cpu").generate(1, condition="effusion")[0]
    assert r.provenance["guidance_scale"] == 1.0 and r.provenance["negative_condition"] is None
    r = GanGenerator(bundle=tiny[1], device="cpu").generate(1, condition="effusion")[0]
    assert r.provenance["guidance_scale"] == 3.0
    with pytest.raises(InputError, match="guidance_scale"):
        train(out=tmp_path / "x", guidance_scale=-1, n_per_condition=8, progress=False)


def test_trainer_rejects_unknown_options(tmp_path):
    with pytest.raises(InputError, match="options"):
        train(out=tmp_path / "x", learning_rate=1.0)
    with pytest.raises(InputError, match="conditioners"):
        train(out=tmp_path / "x", conditioners="property", n_per_condition=8, progress=False)
    for bad in ({"aux_weight": -1}, {"mode_seeking": "a lot"}, {"classifier_steps": 0}, {"upsampling": "bilinear"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            train(out=tmp_path / "x", n_per_condition=8, progress=False, **bad)
    assert not (tmp_path / "x").exists()


def test_aux_classifier_and_mode_seeking_terms_change_training(tiny):
    """The AC-GAN term (aux_weight, on by default) and the mode-seeking term train other weights
    than the plain hinge loss, and are recorded in the bundle's config."""
    d = tiny[0]
    kw = dict(n_per_condition=8, batch_size=8, conditioners="label", g_ch=8, d_ch=8, classifier_steps=3,
              cache=d / "data.npz", samples=None, progress=False, seed=3, checkpoint=None, epochs=1)
    plain = train(out=d / "plain", aux_weight=0, **kw)
    ms = train(out=d / "ms", aux_weight=0, mode_seeking=0.5, **kw)
    ac = train(out=d / "ac", aux_weight=1.0, **kw)
    assert load_bundle(ac).sha256 == load_bundle(train(out=d / "default", **kw)).sha256, "default: the AC-GAN term"
    shas = {load_bundle(p).sha256 for p in (plain, ms, ac)}
    assert len(shas) == 3
    cfg = json.loads((ms / "config.json").read_text())
    assert cfg["aux_weight"] == 0 and cfg["mode_seeking"] == 0.5 and cfg["classifier_steps"] == 3


def test_upsampling_option_trains_and_loads(tiny):
    """``upsampling`` is recorded in the bundle and rebuilt by the plugin: ``resize`` (the default:
    nearest-neighbour + 3x3 convolutions) and ``transposed``; a bundle without the key is transposed."""
    from hygeia_gan.model import Generator

    d = tiny[0]
    kw = dict(n_per_condition=8, batch_size=8, conditioners="label", g_ch=8, d_ch=8, classifier_steps=3,
              cache=d / "data.npz", samples=None, progress=False, seed=3, checkpoint=None, epochs=1)
    tr = train(out=d / "transposed", upsampling="transposed", **kw)
    assert json.loads((tr / "config.json").read_text())["upsampling"] == "transposed"
    assert json.loads((tiny[1] / "config.json").read_text())["upsampling"] == "resize", "the default"
    assert load_bundle(tr).sha256 != load_bundle(tiny[1]).sha256

    def has_resize(bundle):
        return any(isinstance(m, torch.nn.Upsample) for m in GanGenerator(bundle=bundle, device="cpu").net.modules())

    assert has_resize(tiny[1]) and not has_resize(tr)
    cfg = json.loads((tr / "config.json").read_text())
    del cfg["upsampling"]
    (tr / "config.json").write_text(json.dumps(cfg))
    assert not has_resize(tr), "no key: transposed (bundles from before the option)"
    (tr / "config.json").write_text(json.dumps({**cfg, "upsampling": "bicubic"}))
    with pytest.raises(InputError, match="upsampling"):
        GanGenerator(bundle=tr, device="cpu")
    g = GanGenerator(bundle=tiny[1], device="cpu")
    a, b = g.generate(2, condition="effusion", seed=1), g.generate(2, condition="effusion", seed=1)
    assert a[0].pixels.shape == (1, 64, 64) and np.array_equal(a[1].pixels, b[1].pixels)
    with pytest.raises(ValueError, match="upsampling"):
        Generator({"label": 32}, upsampling="bicubic")
