"""The ``vae`` image generator: contract kit, conditioning, input checks, latent space (shipped weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hygeia
from hygeia.errors import InputError, UnsupportedConditionError
from hygeia.testing.contracts import GeneratorContract
from hygeia.vocab import CONDITION_LABELS


class TestImageVAEContract(GeneratorContract):
    plugin_name = "vae"


@pytest.fixture(scope="module")
def vae():
    return hygeia.create("generator", "vae", device="cpu")


def test_condition_recorded_case_insensitive(vae) -> None:
    out = vae.generate(2, condition=" Effusion", seed=3)
    assert [g.condition for g in out] == ["effusion", "effusion"]
    assert out[0].pixel_spacing == pytest.approx((350 / 64, 350 / 64))
    assert out[0].provenance["weights_sha256"] == vae.identity.weights_sha256
    assert vae.generate(1, condition=None, seed=3)[0].condition is None


def test_conditions_differ_and_prefix_is_stable(vae) -> None:
    a = np.stack([g.pixels for g in vae.generate(4, condition="cardiomegaly", seed=5)])
    b = np.stack([g.pixels for g in vae.generate(4, condition="normal", seed=5)])
    assert np.abs(a - b).mean() > 1e-3, "different labels must give different images"
    first = vae.generate(1, condition="cardiomegaly", seed=5)[0].pixels
    # Image i depends on (seed, i), not on n. The decoder's float32 convolutions round differently
    # with the batch size on some CPUs (1.03e-5 seen on an AVX2-only one); another draw differs by ~0.1.
    np.testing.assert_allclose(first, a[0], atol=1e-4)


def test_temperature_controls_diversity(vae) -> None:
    """Temperature scales the noise within the chosen mixture component (the component choice
    does not depend on it), so latents move linearly with it and cold samples vary less."""
    from hygeia_vae._prior import sample_prior
    from hygeia_vae.model import PRIORS

    cold = np.stack([g.pixels for g in vae.generate(16, condition="nodule", seed=1, temperature=0.05)])
    warm = np.stack([g.pixels for g in vae.generate(16, condition="nodule", seed=1, temperature=1.0)])
    assert cold.std(0).mean() < 0.9 * warm.std(0).mean()
    z = {t: sample_prior(vae.prior, PRIORS.index("nodule"), 8, 1, t) for t in (0.0, 0.5, 1.0)}
    torch.testing.assert_close(z[1.0] - z[0.5], z[0.5] - z[0.0], atol=1e-4, rtol=0)
    assert float((z[1.0] - z[0.0]).abs().mean()) > 0.1


def test_progress_called_per_batch(vae) -> None:
    calls: list[tuple[int, int]] = []
    vae.generate(5, condition="normal", seed=0, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


@pytest.mark.parametrize("opts, name", [
    ({"temperature": 0}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"batch_size": 0}, "batch_size"), ({"steps": 3}, "options"), ({"guidance_scale": 21}, "guidance_scale"),
    ({"guidance_scale": float("inf")}, "guidance_scale"), ({"guidance_scale": "2"}, "guidance_scale"),
    ({"negative_condition": "atelectasis"}, "negative_condition"), ({"negative_condition": 0}, "negative_condition"),
])
def test_bad_options(vae, opts, name) -> None:
    with pytest.raises(InputError, match=name):
        vae.generate(1, condition="normal", seed=0, **opts)


def test_guidance_is_flow_paired(vae) -> None:
    """The shipped mixture prior is guided through its flow: each sample z is mapped to the flow's
    noise under its condition and back under the negative (z_b, the same sample without the
    finding), then z_b + s (z - z_b); 'normal' (its own negative) and the null condition are never guided."""
    from hygeia_vae._prior import sample_prior
    from hygeia_vae.model import PRIORS

    assert vae.config["prior"]["guidance"] == "flow" and vae.flow is not None
    px = lambda out: np.stack([g.pixels for g in out])  # noqa: E731
    sf = vae.scaling_factor
    c = PRIORS.index("effusion")
    z = sample_prior(vae.prior, c, 3, 4, vae.defaults["temperature"]).view(3, *vae.latent_shape)
    unguided = px(vae.generate(3, condition="effusion", seed=4, guidance_scale=1))
    np.testing.assert_allclose(unguided, vae.decode(z).cpu().numpy(), atol=1e-5)
    for neg in ("normal", "none", "cardiomegaly"):
        got = vae.generate(3, condition="effusion", seed=4, guidance_scale=2.5, negative_condition=neg)
        assert got[0].provenance["guidance_scale"] == 2.5 and got[0].provenance["negative_condition"] == neg
        with torch.no_grad():
            e = vae.flow.embedding
            u = vae.flow(z * sf, e(torch.full((3,), c)))
            zb = vae.flow.inverse(u, e(torch.full((3,), PRIORS.index(neg)))) / sf
        assert float((zb - z).abs().mean()) > 0.01, "the negative must map the sample elsewhere"
        np.testing.assert_allclose(px(got), vae.decode(zb + 2.5 * (z - zb)).cpu().numpy(), atol=1e-4)
        zero = px(vae.generate(3, condition="effusion", seed=4, guidance_scale=0, negative_condition=neg))
        np.testing.assert_allclose(zero, vae.decode(zb).cpu().numpy(), atol=1e-4)
    unguided_out = vae.generate(3, condition="effusion", seed=4, guidance_scale=1)
    assert unguided_out[0].provenance["negative_condition"] is None, "scale 1 guides away from nothing"
    assert np.abs(px(vae.generate(3, condition="effusion", seed=4, guidance_scale=2.5)) - unguided).mean() > 1e-3
    assert vae.defaults == {"guidance_scale": 7.0, "negative_condition": "normal", "temperature": 1.1}, "shipped"
    for cond in ("normal", None):
        out = vae.generate(2, condition=cond, seed=4, guidance_scale=5, negative_condition="normal")
        assert out[0].provenance["guidance_scale"] == 1.0 and out[0].provenance["negative_condition"] is None
        np.testing.assert_array_equal(px(out), px(vae.generate(2, condition=cond, seed=4, guidance_scale=1)))


def test_bad_condition_and_n(vae) -> None:
    with pytest.raises(UnsupportedConditionError, match="condition"):
        vae.generate(1, condition="fractured femur", seed=0)
    with pytest.raises(InputError, match="n"):
        vae.generate(vae.max_n + 1, condition="normal", seed=0)


def test_latent_space_reconstructs_held_out_phantoms(vae) -> None:
    from hygeia_lab import make_phantom_set

    x = torch.from_numpy(make_phantom_set(16, split="test", size=64, start=100).images)
    z = vae.encode(x)
    assert tuple(z.shape) == (16, *vae.latent_shape) == (16, 4, 16, 16)
    r = vae.decode(z).cpu()
    mse = float((r - x).pow(2).mean())
    assert mse < 0.005, f"held-out reconstruction MSE {mse:.4f}: the shipped weights look untrained"
    scaled = z * vae.scaling_factor
    assert 0.5 < float(scaled.std()) < 2.0, "scaling_factor should bring latents to about unit variance"


def test_priors_cover_every_label(vae) -> None:
    assert vae.config["priors"] == [*CONDITION_LABELS, "none"]
    means = vae.prior["mean"]
    assert means.shape[0] == len(CONDITION_LABELS) + 1
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 0, "two labels share one prior mean"


def test_training_writes_bundle_and_grids(tmp_path) -> None:
    """A tiny run of the real trainer: bundle loadable, one sample grid per epoch, same seed -> same weights."""
    from hygeia_vae.plugin import ImageVAE
    from hygeia_vae.train import train

    def run(name: str) -> ImageVAE:
        train(out=tmp_path / name, seed=3, progress=False, epochs=2, n_per_class=8, batch_size=16, n_val=4,
              prior_rank=4, samples_dir=tmp_path / f"{name}-grids", cache=tmp_path / "cache", guide="mean")
        return ImageVAE(tmp_path / name, device="cpu")

    a = run("a")
    assert sorted(p.name for p in (tmp_path / "a-grids").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert a.generate(1, condition="effusion", seed=0)[0].pixels.shape == (1, 64, 64)
    assert "val_reconstruction_mse" in a.card.metrics
    assert a.config["sampling"] == {"guidance_scale": 7.0, "negative_condition": "normal", "temperature": 1.1}
    assert a.config["prior"] == {"kind": "pca-gmm", "pcs": 96, "components": 30, "guidance": "mean"}
    assert "gmm_chol" in a.prior and a.prior["mean"].shape[0] == len(CONDITION_LABELS) + 1 and a.flow is None
    r = a.generate(1, condition="effusion", seed=0)[0]
    assert r.provenance["guidance_scale"] == 7.0 and r.provenance["temperature"] == 1.1
    from hygeia_vae._prior import sample_prior  # guide="mean": the sample shifted by (s - 1)(mean_c - mean_b)
    from hygeia_vae.model import PRIORS

    for neg in ("normal", "none", "cardiomegaly"):
        got = a.generate(3, condition="effusion", seed=4, guidance_scale=2.5, negative_condition=neg)
        m = a.prior["mean"]
        z = sample_prior(a.prior, PRIORS.index("effusion"), 3, 4, 1.1) + 1.5 * (m[PRIORS.index("effusion")]
                                                                             - m[PRIORS.index(neg)])
        np.testing.assert_allclose(np.stack([g.pixels for g in got]), a.decode(z.view(3, *a.latent_shape)).numpy(),
                                   atol=1e-5)
    assert run("b").identity.weights_sha256 == a.identity.weights_sha256, "same seed must give the same weights"
    with pytest.raises(InputError, match="epochs"):
        train(out=tmp_path / "c", epochs=0)
    with pytest.raises(InputError, match="block_out_channels"):
        train(out=tmp_path / "c", block_out_channels=[8, 12, 16])
    with pytest.raises(InputError, match="attention"):
        train(out=tmp_path / "c", attention="yes")
    with pytest.raises(InputError, match="guidance_scale"):
        train(out=tmp_path / "c", guidance_scale=-2)
    with pytest.raises(InputError, match="negative_condition"):
        train(out=tmp_path / "c", negative_condition="healthy")
    with pytest.raises(InputError, match="prior"):
        train(out=tmp_path / "c", prior="glow")
    with pytest.raises(InputError, match="temperature"):
        train(out=tmp_path / "c", temperature=0)
    with pytest.raises(InputError, match="guide"):
        train(out=tmp_path / "c", guide="classifier")
    train(out=tmp_path / "d", seed=3, progress=False, epochs=1, n_per_class=8, batch_size=16, n_val=4, prior_rank=4,
          samples_dir=tmp_path / "d-grids", cache=tmp_path / "cache", block_out_channels=[8, 8, 16], attention=True,
          prior="gaussian", guide="mean")
    d = ImageVAE(tmp_path / "d", device="cpu")
    assert d.config["autoencoder"]["block_out_channels"] == [8, 8, 16]
    assert d.config["autoencoder"]["mid_block_add_attention"] is True
    assert d.config["prior"] == {"kind": "gaussian", "guidance": "mean"} and "residual" in d.prior
    assert "gmm_chol" not in d.prior
    assert d.generate(1, condition="nodule", seed=0)[0].pixels.shape == (1, 64, 64)


def test_free_text_is_mapped_to_a_label():
    """The VAE takes free text through hygeia.text.label_condition, like the diffusion model."""
    import hygeia
    from hygeia.errors import UnsupportedConditionError
    from hygeia.text import label_phrases

    vae = hygeia.create("generator", "vae", device="cpu")
    by_text = vae.generate(2, condition="chest radiograph with an enlarged heart", seed=3)
    by_label = vae.generate(2, condition="cardiomegaly", seed=3)
    assert np.array_equal(np.stack([g.pixels for g in by_text]), np.stack([g.pixels for g in by_label]))
    assert by_text[0].condition == "cardiomegaly" and by_text[0].provenance["label_from_text"] == "cardiomegaly"
    assert by_text[0].provenance["text_similarity"] > 0.9
    with pytest.raises(UnsupportedConditionError, match="weather"):
        vae.generate(1, condition="the weather is nice today", seed=0)
    assert "pleural effusion" in label_phrases("effusion") and "no finding" in label_phrases("normal")


@pytest.fixture(scope="module")
def tiny_flow_vae(tmp_path_factory):
    """A tiny vae with a flow prior, trained by the real trainer (1 autoencoder epoch, 30 one-batch flow epochs)."""
    from hygeia_vae.plugin import ImageVAE
    from hygeia_vae.train import train

    d = tmp_path_factory.mktemp("flowvae")
    train(out=d / "a", seed=3, progress=False, epochs=1, n_per_class=8, batch_size=16, n_val=4, prior_rank=4,
          samples_dir=d / "grids", cache=d / "cache", prior="flow", prior_epochs=30, prior_blocks=2, prior_hidden=8)
    return ImageVAE(d / "a", device="cpu"), d / "a"


def test_flow_prior_is_invertible_and_learns() -> None:
    """The flow maps latents to noise and back exactly, and training lowers the likelihood loss
    the same way from the same seed."""
    from hygeia_vae.model import GRID
    from hygeia_vae.train import train_flow_prior

    g = torch.Generator().manual_seed(0)
    rows = torch.arange(64) % 3
    mu = torch.randn(64, 4, 16, 16, generator=g) * 0.3 + rows[:, None, None, None].float()  # one mean per row
    sd = torch.full_like(mu, 0.1)
    first: list[float] = []
    flow, log = train_flow_prior(mu, sd, rows, 4, 3, epochs=6, seed=1, blocks=2, hidden=16, batch_size=16,
                                 report=lambda e, n, nll: first.append(nll))
    assert len(first) == 6 and first[-1] < first[0] - 0.1, f"the loss did not fall: {first}"
    assert log["prior_train_nll_per_dim"] == round(first[-1], 4)
    with torch.no_grad():
        u = torch.randn(5, *GRID, generator=g)
        e = flow.embedding(torch.tensor([0, 1, 2, 3, 0]))
        z = flow.inverse(u, e)
        back, _ = flow.inn(z, c=flow._cond(e))
    torch.testing.assert_close(back, u, atol=1e-4, rtol=0)
    again, _ = train_flow_prior(mu, sd, rows, 4, 3, epochs=6, seed=1, blocks=2, hidden=16, batch_size=16)
    for (k, a), b in zip(flow.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs between two runs with one seed"


def test_flow_prior_bundle_samples_and_guides(tiny_flow_vae, tmp_path) -> None:
    """A flow-prior bundle: reproducible, image i independent of n, guidance in latent space
    z_b + s (z_c - z_b) with the same noise (s = 0: exactly the negative condition's image),
    and the autoencoder_from option refits the same prior on the same autoencoder."""
    from hygeia_vae.plugin import ImageVAE
    from hygeia_vae.train import train

    v, path = tiny_flow_vae
    assert v.config["prior"] == {"kind": "flow", "flow": {"blocks": 2, "hidden": 8, "emb": 8, "epochs": 30,
                                                          "noise": 0.25}}
    assert v.flow is not None and "gmm_chol" not in v.prior and v.prior["mean"].shape[0] == len(CONDITION_LABELS) + 1
    px = lambda out: np.stack([g.pixels for g in out])  # noqa: E731
    a = px(v.generate(4, condition="effusion", seed=2))
    np.testing.assert_array_equal(a, px(v.generate(4, condition="effusion", seed=2)))
    np.testing.assert_allclose(px(v.generate(1, condition="effusion", seed=2))[0], a[0], atol=1e-5)
    from hygeia_vae.model import GRID as FLOW_GRID
    from hygeia_vae.model import PRIORS

    u = torch.randn(3, *FLOW_GRID, generator=torch.Generator().manual_seed(0))
    c, b = PRIORS.index("effusion"), PRIORS.index("normal")
    zc, zb = v._flow_latents(u, c, c, 1.0), v._flow_latents(u, b, b, 1.0)
    assert float((zc - zb).abs().mean()) > 1e-4, "two conditions must map the same noise apart"
    torch.testing.assert_close(v._flow_latents(u, c, b, 2.5), zb + 2.5 * (zc - zb), atol=1e-5, rtol=0)
    for neg in ("normal", "none"):
        zero = px(v.generate(4, condition="effusion", seed=2, guidance_scale=0, negative_condition=neg))
        own = px(v.generate(4, condition=neg if neg != "none" else None, seed=2, guidance_scale=1))
        np.testing.assert_allclose(zero, own, atol=1e-5)
    cold = px(v.generate(8, condition="nodule", seed=1, temperature=0.05))
    warm = px(v.generate(8, condition="nodule", seed=1, temperature=1.0))
    assert cold.std(0).mean() < warm.std(0).mean()
    train(out=tmp_path / "b", seed=3, progress=False, n_per_class=8, n_val=4, cache=tmp_path / "cache", prior="flow",
          prior_epochs=30, prior_blocks=2, prior_hidden=8, autoencoder_from=path)
    b = ImageVAE(tmp_path / "b", device="cpu")
    assert b.identity.weights_sha256 == v.identity.weights_sha256, "same autoencoder + seed: the same flow prior"
    assert b.config["training"]["autoencoder_from"]["weights_sha256"] == v.identity.weights_sha256
    with pytest.raises(InputError, match="autoencoder_from"):
        train(out=tmp_path / "c", autoencoder_from=tmp_path / "missing")
    with pytest.raises(InputError, match="prior_epochs"):
        train(out=tmp_path / "c", prior="flow", prior_epochs=0)
